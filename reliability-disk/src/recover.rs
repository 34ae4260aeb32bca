//! Opening a spool directory: list and check segments, replay their frames
//! into an [`Index`], and (when fixing) move what is corrupt to
//! `quarantine/`. Shared by `DiskSpool::open`, [`inspect`](crate::inspect)
//! and [`repair`](crate::repair).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::codec::{self, Entry, MIN_FRAME};
use crate::fsck::{Finding, FindingKind};
use crate::fsio::{create_dir_durably, Fs, Open, SharedFs};
use crate::index::{Index, Loc};

/// The magic at the start of every segment.
pub(crate) const MAGIC: &[u8; 8] = b"RSPOOL01";
/// Format version in the segment header.
pub(crate) const VERSION: u32 = 1;
/// Bytes of the segment header: magic, version, number.
pub(crate) const SEG_HEADER_LEN: u64 = 16;
/// How far past a bad frame to look for the next good one.
const RESYNC_WINDOW: u64 = 16 * 1024 * 1024;
/// Bytes of candidate frames checked (read and CRC'd) at most in the search
/// for the next good frame after a bad one; past it, the rest of the
/// segment is treated as a torn tail (copied to quarantine). Without it a
/// window of garbage in which every byte reads as the start of a large
/// frame costs one large read and CRC per byte.
const RESYNC_BUDGET: u64 = 256 * 1024 * 1024;
/// Read-ahead of the scanner.
const CHUNK: usize = 1024 * 1024;

pub(crate) fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub(crate) fn quarantine_dir(dir: &Path) -> PathBuf {
    dir.join("quarantine")
}

pub(crate) fn segment_name(n: u32) -> String {
    format!("{n:08}.log")
}

pub(crate) fn segment_path(dir: &Path, n: u32) -> PathBuf {
    segments_dir(dir).join(segment_name(n))
}

pub(crate) fn segment_header(n: u32) -> [u8; SEG_HEADER_LEN as usize] {
    let mut h = [0u8; SEG_HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&n.to_le_bytes());
    h
}

/// Parses `NNNNNNNN.log`.
fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What replaying a directory found.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    pub(crate) index: Index,
    /// Valid segments, oldest first: number, length (after fixing), frames.
    pub(crate) segments: Vec<(u32, u64, u64)>,
    /// Where the data of the last segment ends (after its last frame that
    /// is not padding) and whether the padding after it is laid out as
    /// the writer preallocates it (see [`Tail`]).
    pub(crate) last_end: Option<Tail>,
    pub(crate) findings: Vec<Finding>,
}

impl Recovery {
    /// The active (last) segment, where its data ends (the writer resumes
    /// there) and how much of the file the writer may keep as preallocated
    /// padding (the rest it cuts off).
    pub(crate) fn active(&self) -> Option<(u32, u64, u64)> {
        self.segments
            .last()
            .map(|&(n, len, _)| match self.last_end {
                Some(t) if t.on_grid => (n, t.end, len),
                Some(t) => (n, t.end, t.end),
                None => (n, len, len),
            })
    }
}

/// Where a segment's data ends and what follows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    /// After the last frame that is not padding.
    pub(crate) end: u64,
    /// The padding from `end` to the end of the file is what the writer
    /// lays out: one frame up to a multiple of [`PAD_GRID`], then frames of
    /// exactly [`PAD_GRID`] bytes (so a batch written at `end` and padded
    /// to the grid leaves the frames after it whole).
    pub(crate) on_grid: bool,
}

/// Preallocated padding frames start at multiples of this (and are this
/// long, except the one that fills up to the grid after a batch).
pub(crate) const PAD_GRID: u64 = 512;

/// Replays `dir`. With `fix`, bad parts move to `quarantine/` (torn tails
/// are truncated, bad frames padded over, garbage files moved, gaps
/// recorded) so that the next replay finds nothing; without, nothing is
/// changed and the findings are only reported.
pub(crate) fn recover(vfs: &SharedFs, dir: &Path, fix: bool) -> io::Result<Recovery> {
    let seg_dir = segments_dir(dir);
    let q_dir = quarantine_dir(dir);
    if fix {
        create_dir_durably(&**vfs, &seg_dir)?;
        create_dir_durably(&**vfs, &q_dir)?;
    }
    let mut rec = Recovery::default();
    let q = Quarantine {
        dir: q_dir,
        fix,
        fs: vfs.clone(),
    };

    // 1. List: segment files by number, everything else is garbage.
    let mut numbered: BTreeMap<u32, u64> = BTreeMap::new();
    let entries = match fs::read_dir(&seg_dir) {
        Ok(e) => Some(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !fix => None,
        Err(e) => return Err(e),
    };
    let mut garbage: Vec<(PathBuf, String, u64, String)> = Vec::new();
    for entry in entries.into_iter().flatten() {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata()?;
        match parse_segment_name(&name) {
            Some(n) if meta.is_file() => {
                numbered.insert(n, meta.len());
            }
            _ => garbage.push((
                entry.path(),
                name,
                meta.len(),
                "not a segment file name".into(),
            )),
        }
    }

    // 2. Headers. A short file is a segment whose creation was cut short
    // when it is the last one; otherwise garbage.
    let last = numbered.keys().next_back().copied();
    let mut valid: Vec<u32> = Vec::new();
    let mut garbage_numbers: Vec<u32> = Vec::new();
    for (&n, &len) in &numbered {
        let path = segment_path(dir, n);
        if len < SEG_HEADER_LEN {
            if Some(n) == last {
                if len > 0 {
                    let bytes = fs::read(&path)?;
                    q.bytes(
                        &mut rec.findings,
                        Finding::new(FindingKind::TornTail, rel(&path, dir), 0, len)
                            .detail("segment header cut short"),
                        &bytes,
                    )?;
                }
                if fix {
                    let f = vfs.open(&path, Open::Write)?;
                    f.set_len(0)?;
                    vfs.write_at(&f, &segment_header(n), 0)?;
                    vfs.sync_all(&f)?;
                }
                valid.push(n);
            } else {
                garbage.push((
                    path,
                    segment_name(n),
                    len,
                    "segment shorter than its header".into(),
                ));
                garbage_numbers.push(n);
            }
            continue;
        }
        let mut h = [0u8; SEG_HEADER_LEN as usize];
        vfs.read_at(&vfs.open(&path, Open::Read)?, &mut h, 0)?;
        if h != segment_header(n) {
            garbage.push((
                path,
                segment_name(n),
                len,
                "bad segment header (magic, version or number)".into(),
            ));
            garbage_numbers.push(n);
        } else {
            valid.push(n);
        }
    }
    for (path, name, len, why) in garbage {
        q.file(
            &mut rec.findings,
            Finding::new(
                FindingKind::GarbageFile,
                PathBuf::from("segments").join(&name),
                0,
                len,
            )
            .detail(why),
            &path,
            &name,
        )?;
    }

    // 3. Gaps between the remaining segments (a compaction only ever deletes
    // the oldest, so a gap is damage). Each is reported once: a marker file
    // in quarantine records that it is known.
    for w in valid.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b > a + 1 {
            let (from, to) = (a + 1, b - 1);
            let garbage_in_gap = garbage_numbers
                .iter()
                .filter(|g| (from..=to).contains(*g))
                .count() as u64;
            let marker = if from == to {
                format!("missing-{from:08}")
            } else {
                format!("missing-{from:08}-{to:08}")
            };
            if q.dir.join(format!("{marker}.reason")).exists() {
                continue;
            }
            if garbage_in_gap == u64::from(to - from) + 1 {
                // Every number of the gap was a garbage file, reported above;
                // remember the gap so the next open does not report it again.
                if q.fix {
                    let f =
                        Finding::new(FindingKind::MissingSegment, PathBuf::from("segments"), 0, 0)
                            .detail(format!(
                                "segments {from:08} to {to:08} were moved to quarantine as garbage"
                            ));
                    q.write_reason(&marker, &f)?;
                }
                continue;
            }
            let f = Finding::new(
                FindingKind::MissingSegment,
                PathBuf::from("segments").join(segment_name(from)),
                0,
                0,
            )
            .detail(format!(
                "segments {from:08} to {to:08} are missing; records and state changes in them are lost"
            ));
            q.marker(&mut rec.findings, f, &marker)?;
        }
    }

    // 4. Replay.
    let last_valid = valid.last().copied();
    for n in valid {
        let path = segment_path(dir, n);
        let is_last = Some(n) == last_valid;
        let (len, frames, tail) = scan_segment(dir, &path, n, &q, &mut rec, is_last)?;
        rec.segments.push((n, len, frames));
        if is_last {
            rec.last_end = Some(tail);
        }
    }
    Ok(rec)
}

fn rel(path: &Path, dir: &Path) -> PathBuf {
    path.strip_prefix(dir).unwrap_or(path).to_path_buf()
}

/// A decoded frame (entry, size, payload span), or why it is not one.
type Decoded = Result<Option<(Entry, usize, Option<codec::PayloadSpan>)>, codec::DecodeError>;

/// Reads a segment through a read-ahead window.
struct Window {
    fs: SharedFs,
    file: File,
    len: u64,
    buf: Vec<u8>,
    start: u64,
}

impl Window {
    /// At least `min` bytes from `off` (fewer at the end of the file).
    fn at(&mut self, off: u64, min: usize) -> io::Result<&[u8]> {
        let want_end = off.saturating_add(min as u64).min(self.len);
        let have_end = self.start + self.buf.len() as u64;
        if off < self.start || want_end > have_end {
            let n = (self.len - off.min(self.len)).min(min.max(CHUNK) as u64) as usize;
            self.buf.resize(n, 0);
            self.fs.read_at(&self.file, &mut self.buf, off)?;
            self.start = off;
        }
        let from = (off - self.start) as usize;
        Ok(&self.buf[from.min(self.buf.len())..])
    }

    /// Decodes the frame at `off`: `Ok(None)` if it runs past the end.
    fn frame(&mut self, off: u64) -> io::Result<Decoded> {
        let head = self.at(off, codec::HEADER_LEN)?;
        let need = match codec::frame_len(head) {
            Ok(Some(len)) => codec::HEADER_LEN + len as usize,
            Ok(None) => return Ok(Ok(None)),
            Err(e) => return Ok(Err(e)),
        };
        if off + need as u64 > self.len {
            return Ok(Ok(None));
        }
        let w = self.at(off, need)?;
        Ok(codec::decode_frame(w, false))
    }

    /// Whether every byte from `off` to the end is zero.
    fn zeros_from(&mut self, mut off: u64) -> io::Result<bool> {
        while off < self.len {
            let w = self.at(off, CHUNK)?;
            if w.is_empty() {
                break;
            }
            if w.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            off += w.len() as u64;
        }
        Ok(true)
    }

    /// The start of the next good frame after the bad one at `off`.
    fn resync(&mut self, off: u64) -> io::Result<Option<u64>> {
        // A frame whose length is intact (a flipped bit in its body or
        // checksum): the next frame starts right after it.
        if let Ok(Some(len)) = codec::frame_len(self.at(off, codec::HEADER_LEN)?) {
            let next = off + codec::HEADER_LEN as u64 + u64::from(len);
            if next == self.len || (next < self.len && matches!(self.frame(next)?, Ok(Some(_)))) {
                return Ok(Some(next));
            }
        }
        let end = self.len.min(off.saturating_add(RESYNC_WINDOW));
        let mut p = off + 1;
        let mut budget = RESYNC_BUDGET;
        while p + MIN_FRAME as u64 <= end {
            let file_len = self.len;
            let w = self.at(p, MIN_FRAME)?;
            let size = match codec::frame_len(w) {
                Ok(Some(len)) => codec::HEADER_LEN as u64 + u64::from(len),
                _ => u64::MAX,
            };
            let plausible =
                p.saturating_add(size) <= file_len && (1..=9).contains(&w[codec::HEADER_LEN]);
            if plausible {
                if size > budget {
                    return Ok(None);
                }
                budget -= size;
                if matches!(self.frame(p)?, Ok(Some(_))) {
                    return Ok(Some(p));
                }
            }
            p += 1;
        }
        Ok(None)
    }
}

/// Replays one segment into `rec.index`; returns its length (after any
/// truncation), the number of good frames that are not padding, and where
/// its data ends.
fn scan_segment(
    dir: &Path,
    path: &Path,
    n: u32,
    q: &Quarantine,
    rec: &mut Recovery,
    is_last: bool,
) -> io::Result<(u64, u64, Tail)> {
    let file =
        q.fs.open(path, if q.fix { Open::ReadWrite } else { Open::Read })?;
    let len = file.metadata()?.len();
    let mut w = Window {
        fs: q.fs.clone(),
        file,
        len,
        buf: Vec::new(),
        start: 0,
    };
    let name = rel(path, dir);
    let mut off = SEG_HEADER_LEN;
    let mut frames = 0u64;
    let mut tail = Tail {
        end: SEG_HEADER_LEN,
        on_grid: true,
    };
    while off < w.len {
        if let Ok(Some((entry, used, span))) = w.frame(off)? {
            let payload_len = span.map_or(0, |s| s.len as u32);
            let loc = Loc {
                seg: n,
                off,
                len: used as u32,
            };
            rec.index.apply(&entry, loc, payload_len);
            let next = off + used as u64;
            if matches!(entry, Entry::Pad { .. }) {
                let shaped = if off == tail.end {
                    next.is_multiple_of(PAD_GRID)
                } else {
                    off.is_multiple_of(PAD_GRID) && used as u64 == PAD_GRID
                };
                tail.on_grid &= shaped;
            } else {
                frames += 1;
                tail = Tail {
                    end: next,
                    on_grid: true,
                };
            }
            off = next;
            continue;
        }
        let why = match w.frame(off)? {
            Err(e) => e.to_string(),
            _ => "frame runs past the end of the segment".to_string(),
        };
        let rest = w.len - off;
        if w.zeros_from(off)? {
            let f = Finding::new(FindingKind::ZeroTail, name.clone(), off, rest)
                .detail(format!("{rest} zero bytes at the end of the segment"));
            q.note(&mut rec.findings, f)?;
            truncate(q, &mut w, off)?;
            break;
        }
        match w.resync(off)? {
            Some(next) if next - off >= MIN_FRAME as u64 => {
                let f =
                    Finding::new(FindingKind::BadFrame, name.clone(), off, next - off).detail(why);
                q.range(&mut rec.findings, f, &w.file)?;
                tail.on_grid = false;
                if q.fix {
                    let pad = codec::pad_frame((next - off) as usize);
                    q.fs.write_at(&w.file, &pad, off)?;
                    q.fs.sync_data(&w.file)?;
                    w.buf.clear();
                }
                off = next;
            }
            _ => {
                // Nothing good follows (a torn last write), or too little
                // room to pad over: the rest goes to quarantine.
                let detail = if is_last {
                    format!("torn tail: {why}")
                } else {
                    format!("torn tail of a sealed segment: {why}")
                };
                let f = Finding::new(FindingKind::TornTail, name.clone(), off, rest).detail(detail);
                q.range(&mut rec.findings, f, &w.file)?;
                truncate(q, &mut w, off)?;
                break;
            }
        }
    }
    Ok((w.len, frames, tail))
}

fn truncate(q: &Quarantine, w: &mut Window, off: u64) -> io::Result<()> {
    if q.fix {
        w.file.set_len(off)?;
        q.fs.sync_all(&w.file)?;
        w.len = off;
        w.buf.clear();
    }
    Ok(())
}

/// Writes quarantine items (when fixing) and collects findings.
pub(crate) struct Quarantine {
    pub(crate) dir: PathBuf,
    pub(crate) fix: bool,
    pub(crate) fs: SharedFs,
}

impl Quarantine {
    fn reason_text(f: &Finding) -> String {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!(
            "kind: {}\nfile: {}\noffset: {}\nlen: {}\ndetail: {}\nquarantined_at_unix: {at}\n",
            f.kind.code(),
            f.file.display(),
            f.offset,
            f.len,
            f.detail
        )
    }

    /// A fresh stem `base`, `base-1`, ... not yet used in quarantine.
    fn stem(&self, base: &str) -> String {
        let mut stem = base.to_string();
        let mut i = 1;
        while self.dir.join(format!("{stem}.reason")).exists() || self.dir.join(&stem).exists() {
            stem = format!("{base}-{i}");
            i += 1;
        }
        stem
    }

    fn write_reason(&self, stem: &str, f: &Finding) -> io::Result<()> {
        let path = self.dir.join(format!("{stem}.reason"));
        let file = self.fs.open(&path, Open::Create)?;
        self.fs
            .write_at(&file, Self::reason_text(f).as_bytes(), 0)?;
        self.fs.sync_all(&file)
    }

    fn log(f: &Finding) {
        tracing::warn!(
            kind = f.kind.code(),
            file = %f.file.display(),
            offset = f.offset,
            len = f.len,
            detail = %f.detail,
            "disk spool: corruption quarantined"
        );
    }

    /// Copies `bytes` to quarantine with a reason file.
    pub(crate) fn bytes(&self, out: &mut Vec<Finding>, f: Finding, bytes: &[u8]) -> io::Result<()> {
        self.copy(out, f, |fs, to| fs.write_at(to, bytes, 0))
    }

    /// Copies the bytes of `file` the finding covers (`f.offset`, `f.len`)
    /// to quarantine with a reason file, a piece at a time (a torn tail can
    /// be as large as the segment).
    fn range(&self, out: &mut Vec<Finding>, f: Finding, file: &File) -> io::Result<()> {
        let (from, len) = (f.offset, f.len);
        self.copy(out, f, |fs, to| {
            let mut buf = vec![0u8; CHUNK];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                fs.read_at(file, &mut buf[..n], from + done)?;
                fs.write_at(to, &buf[..n], done)?;
                done += n as u64;
            }
            Ok(())
        })
    }

    /// Writes a quarantine item (its bytes by `write`) and its reason file.
    fn copy(
        &self,
        out: &mut Vec<Finding>,
        f: Finding,
        write: impl FnOnce(&dyn Fs, &File) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.fix {
            let base = format!(
                "{}@{}",
                f.file
                    .file_name()
                    .map_or_else(|| "unknown".into(), |s| s.to_string_lossy().into_owned()),
                f.offset
            );
            let stem = self.stem(&base);
            let file = self
                .fs
                .open(&self.dir.join(format!("{stem}.bin")), Open::Create)?;
            write(&*self.fs, &file)?;
            self.fs.sync_all(&file)?;
            self.write_reason(&stem, &f)?;
            self.fs.sync_dir(&self.dir)?;
            Self::log(&f);
        }
        out.push(f);
        Ok(())
    }

    /// Moves the file at `path` into quarantine.
    fn file(&self, out: &mut Vec<Finding>, f: Finding, path: &Path, name: &str) -> io::Result<()> {
        if self.fix {
            let stem = self.stem(name);
            self.fs.rename(path, &self.dir.join(&stem))?;
            self.write_reason(&stem, &f)?;
            self.fs.sync_dir(&self.dir)?;
            if let Some(parent) = path.parent() {
                self.fs.sync_dir(parent)?;
            }
            Self::log(&f);
        }
        out.push(f);
        Ok(())
    }

    /// A reason file only (zero tails: nothing worth keeping).
    fn note(&self, out: &mut Vec<Finding>, f: Finding) -> io::Result<()> {
        if self.fix {
            let base = format!(
                "{}@{}",
                f.file
                    .file_name()
                    .map_or_else(|| "unknown".into(), |s| s.to_string_lossy().into_owned()),
                f.offset
            );
            let stem = self.stem(&base);
            self.write_reason(&stem, &f)?;
            self.fs.sync_dir(&self.dir)?;
            Self::log(&f);
        }
        out.push(f);
        Ok(())
    }

    /// A marker reason file under a fixed name (missing segments).
    fn marker(&self, out: &mut Vec<Finding>, f: Finding, stem: &str) -> io::Result<()> {
        if self.fix {
            self.write_reason(stem, &f)?;
            self.fs.sync_dir(&self.dir)?;
            Self::log(&f);
        }
        out.push(f);
        Ok(())
    }
}
