//! Secrets never leak: the redaction of free text and of Redis URLs, by
//! example (each defect found once) and by property (any password, any
//! place it appears).

use reliability_core::config::RedisUrl;
use reliability_core::status::{redact, Redacted};

/// A password holding `; , ( ) ' "`, the characters that once ended the
/// URL token before its `@` was looked for: the password came out whole.
#[test]
fn redact_userinfo_hides_passwords_with_delimiters() {
    for password in [
        "p;ss",
        "p,ss",
        "p(ss",
        "p)ss",
        "p'ss",
        "p\"ss",
        "p<ss>",
        "a;b,c(d)e'f\"g",
    ] {
        let url = format!("redis://app:{password}@h:6379/0");
        let out = redact(&url);
        assert_eq!(out, "redis://app:***@h:6379/0", "{url}");
        let text = format!("connect {url} failed: refused");
        let out = redact(&text);
        assert!(!out.contains(password), "{text} -> {out}");
        assert!(!out.contains("ss@"), "{text} -> {out}");

        let u = RedisUrl::new(url.clone()).expect("a valid URL");
        let shown = [
            u.to_string(),
            format!("{u:?}"),
            u.redacted(),
            serde_norway::to_string(&u).expect("serializes"),
            Redacted::new(&url).to_string(),
        ];
        for s in shown {
            assert!(!s.contains(password), "{url} -> {s}");
            assert!(!s.contains("ss@"), "{url} -> {s}");
        }
    }
}
