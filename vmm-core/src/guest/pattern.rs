//! The deterministic write sequence, as plain Rust. The guest program implements exactly these
//! functions in x86-64 assembly; the oracle replays them on the host.
//!
//! - Step `s` (1-based) of vCPU `v` writes working-set page `step_page(vcpu_key(seed, v), s, ws)`.
//! - A page at GPA `g` written with stamp `t` holds qword 0 = `t` and qword `i` (1..512) =
//!   `page_base(t, g) + i * WORD_STEP`. The generation-0 fill uses stamp 0.

/// Golden-ratio constant used to spread step numbers and vCPU ids.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Multiplier for the stamp in `page_base`.
pub const STAMP_MUL: u64 = 0xD6E8_FEB8_6659_FD93;
/// Multiplier for the page frame number in `page_base`.
pub const PFN_MUL: u64 = 0xA076_1D64_78BD_642F;
/// Increment between consecutive qwords of a page (odd).
pub const WORD_STEP: u64 = 0x2545_F491_4F6C_DD1D;
/// First multiplier of the splitmix64 finaliser.
pub const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
/// Second multiplier of the splitmix64 finaliser.
pub const MIX2: u64 = 0x94D0_49BB_1331_11EB;
/// Qwords per 4 KiB page.
pub const WORDS: usize = 512;

/// splitmix64's finaliser: a cheap, well-spread 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

/// Per-vCPU key derived from the seed (the VMM stores it in the vCPU's control block).
#[inline]
pub fn vcpu_key(seed: u64, vcpu: u8) -> u64 {
    mix64(seed ^ (u64::from(vcpu) + 1).wrapping_mul(GOLDEN))
}

/// Working-set page index written by step `s` (`0..ws`).
#[inline]
pub fn step_page(key: u64, s: u64, ws: u64) -> u64 {
    let h = mix64(s.wrapping_mul(GOLDEN).wrapping_add(key));
    ((u128::from(h) * u128::from(ws)) >> 64) as u64
}

/// Base value of a page's content for `stamp` at `gpa`.
#[inline]
pub fn page_base(stamp: u64, gpa: u64) -> u64 {
    mix64(stamp.wrapping_mul(STAMP_MUL) ^ (gpa >> 12).wrapping_mul(PFN_MUL))
}

/// Fills `out` with the content of the page at `gpa` written with `stamp`.
pub fn page_content(stamp: u64, gpa: u64, out: &mut [u64; WORDS]) {
    out[0] = stamp;
    let mut v = page_base(stamp, gpa);
    for w in out.iter_mut().skip(1) {
        v = v.wrapping_add(WORD_STEP);
        *w = v;
    }
}

/// True if `page` holds exactly the content for `stamp` at `gpa`.
pub fn page_matches(stamp: u64, gpa: u64, page: &[u64; WORDS]) -> bool {
    if page[0] != stamp {
        return false;
    }
    let mut v = page_base(stamp, gpa);
    page[1..].iter().all(|&w| {
        v = v.wrapping_add(WORD_STEP);
        w == v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trip() {
        let mut p = [0u64; WORDS];
        page_content(42, 0x40_0000, &mut p);
        assert!(page_matches(42, 0x40_0000, &p));
        assert!(!page_matches(41, 0x40_0000, &p));
        assert!(!page_matches(42, 0x40_1000, &p));
        page_content(0, 0x40_0000, &mut p);
        assert!(p.iter().skip(1).all(|&w| w != 0));
    }

    #[test]
    fn steps_stay_in_working_set() {
        let key = vcpu_key(7, 1);
        for s in 1..10_000 {
            assert!(step_page(key, s, 37) < 37);
        }
        assert_ne!(vcpu_key(7, 0), vcpu_key(7, 1));
    }
}
