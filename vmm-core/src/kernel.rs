//! Loading a kernel for the Linux x86 64-bit boot protocol: an ELF kernel (vmlinux-style, entered
//! at its ELF entry in 64-bit mode) or a bzImage (boot protocol >= 2.12 with `XLF_KERNEL_64`,
//! entered at +0x200 of its protected-mode code), an optional initrd, the command line and the
//! zero page (`struct boot_params`). Addresses come from [`crate::layout`].
//!
//! What the zero page holds:
//! - bzImage: the image's own setup header (bytes 0x1f1 up to `0x202 + byte at 0x201`; bytes past
//!   the header's end are zeroed) with the loader's fields filled in; ELF: a minimal header
//!   (boot flag, "HdrS", alignment) as other VMMs write for vmlinux;
//! - `type_of_loader` 0xff (undefined), `cmd_line_ptr`, `ramdisk_image`/`ramdisk_size`;
//! - the e820 map from [`layout::e820_map`] (it reserves the legacy area that holds the MP table,
//!   the ACPI tables and the boot TSS with its I/O bitmap, so the kernel never reuses them unknowingly);
//! - `acpi_rsdp_addr` (the MADT written by [`crate::arch::acpi`]).
//!
//! The initrd goes page-aligned as high as possible in low RAM, its last byte at or below the
//! image's `initrd_addr_max` and above everything the kernel needs (`init_size` bytes from its
//! run-time start for a bzImage, the end of its segments for ELF).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use serde::{Deserialize, Serialize};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::VmError;

/// A kernel to boot instead of the built-in guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelConfig {
    /// ELF (vmlinux-style, 64-bit entry) or bzImage kernel.
    #[serde(with = "crate::exact_path")]
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    #[serde(default, with = "crate::exact_path::option")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Which kind of image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelFormat {
    /// 64-bit ELF, entered at its ELF entry point.
    Elf,
    /// bzImage, entered at its 64-bit entry (+0x200).
    BzImage,
}

/// Where a kernel was loaded and how it is entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Image kind.
    pub format: KernelFormat,
    /// 64-bit entry point (RIP of the bootstrap vCPU).
    pub entry: u64,
    /// First byte of the loaded image.
    pub load_addr: u64,
    /// End of the memory the kernel needs (image, bss, decompression room).
    pub needed_end: u64,
    /// Boot protocol version from the setup header (bzImage only).
    pub protocol_version: Option<u16>,
    /// Initrd placement `(gpa, size)`.
    pub initrd: Option<(u64, u64)>,
    /// Command line length without its NUL.
    pub cmdline_len: usize,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xAA55;
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// First boot protocol version with `xloadflags` (and so a declared 64-bit entry).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// xloadflags: the image has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// type_of_loader: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Command line limit for ELF kernels (x86 COMMAND_LINE_SIZE, including the NUL).
const ELF_CMDLINE_SIZE: u64 = 2048;
/// Kernel alignment announced for ELF kernels (what vmlinux is linked for).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
const EM_X86_64: u16 = 62;

fn open(path: &Path, what: &'static str) -> Result<File, VmError> {
    File::open(path).map_err(|source| VmError::KernelFile {
        what,
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, msg: impl Into<String>) -> VmError {
    VmError::KernelFormat {
        path: path.to_owned(),
        reason: msg.into(),
    }
}

/// Reads `n` bytes at `off`, or fewer if the file is shorter.
fn read_at(f: &mut File, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(off))?;
    let mut v = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut v)?;
    Ok(v)
}

/// Detects the image kind from its first bytes.
pub fn detect(path: &Path) -> Result<KernelFormat, VmError> {
    let mut f = open(path, "kernel")?;
    let io = |source| VmError::KernelFile {
        what: "kernel",
        path: path.to_owned(),
        source,
    };
    let head = read_at(&mut f, 0, 0x210).map_err(io)?;
    if head.len() >= 20 && head[..4] == ELF_MAGIC {
        if head[4] != 2 {
            return Err(bad(path, "32-bit ELF; only 64-bit kernels boot"));
        }
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if machine != EM_X86_64 {
            return Err(bad(path, format!("ELF machine {machine}, not x86-64")));
        }
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(bad(
        path,
        "neither an ELF file nor a bzImage (no \"HdrS\" at 0x202)",
    ))
}

/// End of the highest PT_LOAD segment in memory (`p_paddr + p_memsz`) of a 64-bit ELF.
fn elf_load_end(f: &mut File) -> std::io::Result<u64> {
    let eh = read_at(f, 0, 64)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    if eh.len() < 64 {
        return Ok(0);
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
    let mut end = 0;
    for i in 0..u64::from(phnum) {
        let ph = read_at(f, phoff + i * u64::from(phentsize), 56)?;
        if ph.len() == 56 && u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 1 {
            end = end.max(u64_at(&ph, 24).saturating_add(u64_at(&ph, 40)));
        }
    }
    Ok(end)
}

fn loader_err(path: &Path) -> impl FnOnce(linux_loader::loader::Error) -> VmError + '_ {
    move |source| VmError::KernelLoad {
        path: path.to_owned(),
        source,
    }
}

/// Loads `cfg`'s kernel, initrd, command line and zero page into `mem` (RAM of `mem_bytes`).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    cfg: &KernelConfig,
) -> Result<LoadedKernel, VmError> {
    let path = cfg.kernel.as_path();
    let format = detect(path)?;
    let mut f = open(path, "kernel")?;
    let low_top = mem_bytes.min(layout::LOW_RAM_END);
    let (mut hdr, entry, load_addr, needed_end, cmdline_cap, addr_max, version) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
                .map_err(loader_err(path))?;
            let hdr = setup_header {
                boot_flag: BOOT_FLAG,
                header: HDRS_MAGIC,
                kernel_alignment: ELF_KERNEL_ALIGNMENT,
                cmdline_size: (ELF_CMDLINE_SIZE - 1) as u32,
                ..Default::default()
            };
            let entry = r.kernel_load.0;
            // linux-loader's kernel_end skips segments without file bytes (bss); count them.
            let end = elf_load_end(&mut f)
                .map_err(|source| VmError::KernelFile {
                    what: "kernel",
                    path: path.to_owned(),
                    source,
                })?
                .max(r.kernel_end);
            (
                hdr,
                entry,
                entry,
                end,
                ELF_CMDLINE_SIZE - 1,
                low_top - 1,
                None,
            )
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
                .map_err(loader_err(path))?;
            let mut hdr = r
                .setup_header
                .ok_or_else(|| bad(path, "the loader returned no setup header"))?;
            let version = hdr.version;
            if version < MIN_BOOT_PROTOCOL {
                return Err(bad(
                    path,
                    format!(
                        "boot protocol {}.{:02} is older than 2.12: no 64-bit entry point",
                        version >> 8,
                        version & 0xff
                    ),
                ));
            }
            let xloadflags = hdr.xloadflags;
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(bad(
                    path,
                    "xloadflags lacks XLF_KERNEL_64: no 64-bit entry point",
                ));
            }
            // Only the header proper belongs to the boot protocol; what follows it in the image
            // (for headers shorter than linux-loader's struct) is setup code.
            let end = 0x202 + u64::from(hdr.jump >> 8);
            let keep = end.saturating_sub(SETUP_HEADER_OFFSET) as usize;
            let bytes = hdr.as_mut_slice();
            if keep < bytes.len() {
                bytes[keep..].fill(0);
            }
            let load = r.kernel_load.0;
            // The kernel runs from its load address or, if relocatable, from there aligned up;
            // never below its preferred address when it has to move. Budget init_size from the
            // higher of the two.
            let run_start = load.max(hdr.pref_address);
            let needed = (run_start + u64::from(hdr.init_size)).max(r.kernel_end);
            let cap = u64::from(hdr.cmdline_size).min(layout::CMDLINE_MAX_SIZE - 1);
            let addr_max = u64::from(hdr.initrd_addr_max);
            (
                hdr,
                load + layout::BZIMAGE_ENTRY64_OFFSET,
                load,
                needed,
                cap,
                addr_max,
                Some(version),
            )
        }
    };
    if needed_end > low_top {
        return Err(VmError::KernelPlacement(format!(
            "the kernel needs RAM up to {needed_end:#x} but low RAM ends at {low_top:#x}: give the VM more memory"
        )));
    }

    let cmd = cfg.cmdline.as_bytes();
    if cmd.contains(&0) {
        return Err(VmError::KernelPlacement(
            "the command line contains a NUL byte".into(),
        ));
    }
    if cmd.len() as u64 > cmdline_cap {
        return Err(VmError::KernelPlacement(format!(
            "the command line is {} bytes; this kernel takes at most {cmdline_cap}",
            cmd.len()
        )));
    }
    let mut z = cmd.to_vec();
    z.push(0);
    mem.write_slice(&z, GuestAddress(layout::CMDLINE_START))
        .map_err(VmError::GuestMemory)?;

    let initrd = match &cfg.initrd {
        None => None,
        Some(p) => Some(load_initrd(mem, mem_bytes, p, addr_max, needed_end)?),
    };

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    let (rd_start, rd_size) = initrd.unwrap_or((0, 0));
    hdr.ramdisk_image = rd_start as u32;
    hdr.ramdisk_size = rd_size as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.acpi_rsdp_addr = layout::ACPI_RSDP_START;
    params.ext_ramdisk_image = (rd_start >> 32) as u32;
    params.ext_ramdisk_size = (rd_size >> 32) as u32;
    let map = layout::e820_map(mem_bytes);
    if map.len() > params.e820_table.len() {
        return Err(VmError::KernelPlacement("e820 map too long".into()));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(VmError::GuestMemory)?;
    Ok(LoadedKernel {
        format,
        entry,
        load_addr,
        needed_end,
        protocol_version: version,
        initrd,
        cmdline_len: cmd.len(),
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    addr_max: u64,
    lowest: u64,
) -> Result<(u64, u64), VmError> {
    let mut f = open(path, "initrd")?;
    let io = |source| VmError::KernelFile {
        what: "initrd",
        path: path.to_owned(),
        source,
    };
    let size = f.metadata().map_err(io)?.len();
    if size == 0 {
        return Err(VmError::KernelPlacement(format!(
            "initrd {} is empty",
            path.display()
        )));
    }
    let start = layout::initrd_start(mem_bytes, size, addr_max, lowest).ok_or_else(|| {
        VmError::KernelPlacement(format!(
            "initrd of {size} bytes does not fit between the kernel (up to {lowest:#x}) and \
             min(end of low RAM, initrd_addr_max {addr_max:#x})"
        ))
    })?;
    let len =
        usize::try_from(size).map_err(|_| VmError::KernelPlacement("initrd too large".into()))?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, len)
        .map_err(VmError::GuestMemory)?;
    Ok((start, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_missing_files() {
        let dir = std::env::temp_dir().join(format!("vmm-core-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk");
        std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
        assert!(matches!(detect(&p), Err(VmError::KernelFormat { .. })));
        assert!(matches!(
            detect(&dir.join("missing")),
            Err(VmError::KernelFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_bzimage_is_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-core-oldbz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bz");
        let mut img = vec![0u8; 0x2000];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x020au16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&(layout::HIMEM_START as u32).to_le_bytes());
        std::fs::write(&p, &img).unwrap();
        assert_eq!(detect(&p).unwrap(), KernelFormat::BzImage);
        let mem = crate::create_guest_memory(16 << 20, crate::MemBackend::Anon).unwrap();
        let cfg = KernelConfig {
            kernel: p,
            initrd: None,
            cmdline: String::new(),
        };
        let e = load(&mem, 16 << 20, &cfg).unwrap_err();
        assert!(e.to_string().contains("older than 2.12"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
