//! TEMPORARY until the format-3 merge.
use std::path::Path;
pub type Identity = (u64, u64);
pub struct ParentRef;
impl ParentRef {
    pub fn new(_i: Identity, _p: &Path, _c: &Path) -> Self { ParentRef }
    pub fn encode(&self) -> Vec<u8> { Vec::new() }
}
pub fn identity<R: std::io::Read + std::io::Seek>(r: &ram_saver::SnapshotReader<R>) -> Identity {
    (r.file_len(), r.header().created_unix_secs ^ r.trailer().totals.stored_bytes)
}
