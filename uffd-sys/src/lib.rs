//! The userfaultfd kernel ABI by hand: structs, ioctl numbers, feature bits, PAGEMAP_SCAN, thin safe wrappers.
