//! The userfaultfd kernel ABI by hand: structs, ioctl numbers, feature bits, PAGEMAP_SCAN, thin safe wrappers.
//!
//! - [`abi`] (re-exported at the crate root): `#[repr(C)]` mirrors of `include/uapi/linux/userfaultfd.h`
//!   and the PAGEMAP_SCAN part of `include/uapi/linux/fs.h`, with layout tests.
//! - [`Userfaultfd`]: an owned userfaultfd able to handle kernel-mode faults (opened through
//!   `/dev/userfaultfd`, falling back to the syscall, never `UFFD_USER_MODE_ONLY`), with one method per
//!   ioctl. Ioctls that cannot write memory are safe; COPY, ZEROPAGE, CONTINUE, MOVE and POISON are
//!   `unsafe fn`s.
//! - [`pagemap`]: PAGEMAP_SCAN, classic `/proc/self/pagemap` reads and `mincore`, to see which pages
//!   are present and which still carry the uffd-wp bit.
//! - [`host`]: the few other host calls the VMM and the save engine need (memory advice, thread
//!   priority, heap trim, page size), so that every unsafe system call has one home.
//!
//! x86-64 / LP64 Linux only (the ioctl numbers and layouts are pinned for that ABI).

pub mod abi;
pub mod host;
pub mod pagemap;
#[cfg(test)]
mod test_util;
mod uffd;

pub use abi::*;
pub use uffd::{ApiInfo, Features, OpenError, OpenPath, Userfaultfd};
