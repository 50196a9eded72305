//! Builds the test kernel (guests/testkernel) with the system C compiler at test time, wraps it
//! as a bzImage, and reads its status block. Nothing is committed: outputs go to Cargo's
//! per-target temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the test kernel's image starts (its linker script).
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Its status block (entry.S, `struct status` in testkernel.c).
pub const STATUS_GPA: u64 = 0x10_0100;
/// Its 64-bit entry point.
pub const ENTRY: u64 = 0x10_0200;

/// Paths of the built kernel.
#[derive(Debug, Clone)]
pub struct TestKernel {
    /// The ELF (entry 0x100200).
    pub elf: PathBuf,
    /// The same code wrapped as a bzImage (protocol 2.15, XLF_KERNEL_64).
    pub bzimage: PathBuf,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/testkernel")
}

/// Builds once per test process.
pub fn build() -> &'static TestKernel {
    static K: OnceLock<TestKernel> = OnceLock::new();
    K.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testkernel");
        std::fs::create_dir_all(&out).unwrap();
        let src = src_dir();
        let pid = std::process::id();
        let tmp = out.join(format!("testkernel.elf.{pid}"));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let st = Command::new(&cc)
            .args(
                std::fs::read_to_string(src.join("cflags"))
                    .expect("reading guests/testkernel/cflags")
                    .split_whitespace(),
            )
            .arg(format!("-Wl,-T,{}", src.join("testkernel.ld").display()))
            .arg("-o")
            .arg(&tmp)
            .arg(src.join("entry.S"))
            .arg(src.join("testkernel.c"))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {cc} (a C compiler is needed to build the test kernel): {e}")
            });
        assert!(st.success(), "building the test kernel with {cc} failed");
        let elf = out.join("testkernel.elf");
        std::fs::rename(&tmp, &elf).unwrap();
        let bz_tmp = out.join(format!("testkernel.bzImage.{pid}"));
        std::fs::write(&bz_tmp, wrap_bzimage(&std::fs::read(&elf).unwrap())).unwrap();
        let bzimage = out.join("testkernel.bzImage");
        std::fs::rename(&bz_tmp, &bzimage).unwrap();
        TestKernel { elf, bzimage }
    })
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Wraps the ELF's loadable bytes (flat from IMAGE_BASE) behind a minimal bzImage setup header:
/// one setup sector, boot protocol 2.15, LOADED_HIGH, code32_start = pref_address = IMAGE_BASE,
/// not relocatable, XLF_KERNEL_64 (so the 64-bit entry at +0x200 is ENTRY), init_size covering
/// the bss.
pub fn wrap_bzimage(elf: &[u8]) -> Vec<u8> {
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 32) as usize,
        u16_at(elf, 54) as usize,
        u16_at(elf, 56) as usize,
    );
    let mut flat = Vec::new();
    let mut mem_end = 0u64;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        if u32_at(ph, 0) != 1 {
            continue;
        }
        let (off, paddr, filesz, memsz) = (
            u64_at(ph, 8) as usize,
            u64_at(ph, 24),
            u64_at(ph, 32) as usize,
            u64_at(ph, 40),
        );
        mem_end = mem_end.max(paddr + memsz);
        if filesz == 0 {
            continue;
        }
        let at = (paddr - IMAGE_BASE) as usize;
        if flat.len() < at + filesz {
            flat.resize(at + filesz, 0);
        }
        flat[at..at + filesz].copy_from_slice(&elf[off..off + filesz]);
    }
    let mut setup = vec![0u8; 2 * 512];
    let put = |s: &mut Vec<u8>, o: usize, b: &[u8]| s[o..o + b.len()].copy_from_slice(b);
    put(&mut setup, 0x1f1, &[1]); // setup_sects
    put(
        &mut setup,
        0x1f4,
        &((flat.len() as u32).div_ceil(16)).to_le_bytes(),
    ); // syssize
    put(&mut setup, 0x1fe, &0xAA55u16.to_le_bytes());
    put(&mut setup, 0x200, &[0xEB, (0x268u16 - 0x202) as u8]); // jump; header ends at 0x268
    put(&mut setup, 0x202, b"HdrS");
    put(&mut setup, 0x206, &0x020Fu16.to_le_bytes());
    put(&mut setup, 0x211, &[1]); // LOADED_HIGH
    put(&mut setup, 0x214, &(IMAGE_BASE as u32).to_le_bytes());
    put(&mut setup, 0x22c, &0x7FFF_FFFFu32.to_le_bytes()); // initrd_addr_max
    put(&mut setup, 0x230, &0x1000u32.to_le_bytes()); // kernel_alignment
    put(&mut setup, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut setup, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut setup, 0x258, &IMAGE_BASE.to_le_bytes()); // pref_address
    let init = (mem_end - IMAGE_BASE).next_multiple_of(4096) as u32;
    put(&mut setup, 0x260, &init.to_le_bytes()); // init_size
    setup.extend_from_slice(&flat);
    setup
}

/// The test kernel's status block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// 1 = checks done, 2 = write loop running, 3 = `tk.boot_tss` port checks done, 4 = `tk.full`
    /// loop running.
    pub phase: u64,
    /// Failed boot checks.
    pub failures: u64,
    /// Write steps done.
    pub steps: u64,
    /// Timer ticks.
    pub ticks: u64,
    /// Pages found with wrong previous content.
    pub bad_pages: u64,
    /// Bytes received on COM1.
    pub rx_bytes: u64,
}

/// Reads the status block from guest memory.
pub fn status(mem: &GuestMemoryMmap) -> Status {
    let r = |i: u64| -> u64 { mem.read_obj(GuestAddress(STATUS_GPA + 8 * i)).unwrap() };
    assert_eq!(r(0), u64::from_le_bytes(*b"TKSTAT01"), "status block magic");
    Status {
        phase: r(1),
        failures: r(2),
        steps: r(3),
        ticks: r(4),
        bad_pages: r(5),
        rx_bytes: r(6),
    }
}

/// FNV-1a 64, as the test kernel computes it over the initrd.
pub fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}
