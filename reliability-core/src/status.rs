//! Health status model.
