//! End-to-end tests across crates (see tests/).
