//! The `machine` component (memory size, vCPU count, memory backend) and the optional `notes`
//! component (host quirks noted at capture).

use super::codec::{BodyReader, BodyWriter};
use super::{bad, Component};
use crate::{MemBackend, VmConfig, VmError};

/// The machine's shape: what guest memory and how many vCPUs the other components belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineShape {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where guest RAM came from (restore may use another backend).
    pub backend: MemBackend,
}

impl MachineShape {
    /// The shape part of a VM configuration.
    pub fn of(c: &VmConfig) -> Self {
        MachineShape {
            mem_bytes: c.mem_bytes,
            vcpus: c.vcpus,
            backend: c.backend,
        }
    }
}

/// Backend codes in the `machine` body.
const BACKENDS: [MemBackend; 3] = [MemBackend::Anon, MemBackend::Memfd, MemBackend::Hugetlbfs];

/// Body, version 1: `mem_bytes` u64, `vcpus` u8, `backend` u8 (0 anonymous, 1 memfd,
/// 2 hugetlbfs).
impl Component for MachineShape {
    const NAME: &'static str = "machine";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.u64(self.mem_bytes);
        w.u8(self.vcpus);
        let code = BACKENDS.iter().position(|b| *b == self.backend);
        // Every backend is in the table (unit-tested).
        w.u8(code.unwrap_or(BACKENDS.len()) as u8);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        let mem_bytes = r.u64("machine")?;
        let vcpus = r.u8("machine")?;
        let code = r.u8("machine")?;
        let backend = *BACKENDS.get(usize::from(code)).ok_or_else(|| {
            bad(
                "machine",
                None,
                format!(
                    "memory backend code {code}, expected 0..={}",
                    BACKENDS.len() - 1
                ),
            )
        })?;
        Ok(MachineShape {
            mem_bytes,
            vcpus,
            backend,
        })
    }

    /// vCPUs `1..=MAX_VCPUS`, a memory size vmm-core can build.
    fn check(&self) -> Result<(), VmError> {
        let max = crate::layout::MAX_VCPUS;
        if !(1..=max).contains(&self.vcpus) {
            return Err(bad(
                "machine",
                None,
                format!("{} vCPUs, expected 1..={max}", self.vcpus),
            ));
        }
        crate::memory::validate_mem_size(self.mem_bytes)
            .map_err(|e| bad("machine", None, e.to_string()))
    }
}

/// Most notes a machine state carries.
pub const MAX_NOTES: usize = 256;

/// Host quirks noted when the state was captured (e.g. dropped MSRs): for people, not for
/// restore. Optional: a state without notes has no `notes` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes(pub Vec<String>);

/// Body, version 1: list of UTF-8 blobs.
impl Component for Notes {
    const NAME: &'static str = "notes";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.list("notes", &self.0, |w, n| w.blob("notes", n.as_bytes()));
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        let n = r.count("notes", MAX_NOTES)?;
        Ok(Notes(
            (0..n).map(|_| r.text("notes")).collect::<Result<_, _>>()?,
        ))
    }

    fn check(&self) -> Result<(), VmError> {
        if self.0.len() > MAX_NOTES {
            return Err(bad(
                "notes",
                None,
                format!("{} entries, at most {MAX_NOTES}", self.0.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_has_a_code() {
        for b in [MemBackend::Anon, MemBackend::Memfd, MemBackend::Hugetlbfs] {
            let s = MachineShape {
                mem_bytes: 64 << 20,
                vcpus: 1,
                backend: b,
            };
            let mut w = BodyWriter::new();
            s.encode(&mut w);
            let body = w.finish().unwrap();
            let back = MachineShape::decode(&mut BodyReader::new("machine", &body), 1).unwrap();
            assert_eq!(back, s);
        }
    }
}
