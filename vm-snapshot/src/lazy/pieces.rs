//! What a fault fills: the piece of its record around the faulting page. A record stored in
//! pieces (zstd or raw in pieces) is read (and decoded) one checked piece at a time (its
//! header, piece table and that piece, never the rest); any other record (plain raw or one zstd
//! frame: a single-piece record, or a file of format 1) is read whole (through the fault
//! thread's [`DecodeCache`]) and the [`FAULT_PIECE`] around the page is filled.

use std::cell::RefCell;

use super::fill::DecodeCache;
use super::*;

thread_local! {
    /// The fault thread's piece (decoded, or raw pages as read).
    static PIECE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// Fills the piece of chunk `c` around guest page `page` for a fault; returns the pages
    /// filled, `[from, to)` relative to the chunk's first page, and the bytes this call filled.
    pub(super) fn fill_fault_piece(
        &self,
        tracker: &MissingTracker,
        cache: &mut DecodeCache,
        c: usize,
        page: u64,
    ) -> Result<(u64, u64, u64), LazyFailure> {
        let ch = self.chunks[c];
        let n = u64::from(ch.pages);
        let served = PIECE.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            let piece = self
                .reader(&ch)
                .read_piece_at(ch.record as usize, page, buf)
                .map_err(|e| LazyFailure::Record(super::fill::layer_error(self, &ch, &e)))?;
            let Some(p) = piece else {
                return Ok(None);
            };
            // The piece ∩ the chunk (a piece larger than a huge page spans several chunks).
            let from = p.first_page.max(ch.first_page);
            let to = (p.first_page + u64::from(p.page_count)).min(ch.first_page + n);
            let ps = self.page_size;
            let src =
                &buf[((from - p.first_page) * ps) as usize..((to - p.first_page) * ps) as usize];
            let filled = tracker
                .fill(self.host(from, to - from), src)
                .map_err(|e| LazyFailure::Fill(chain(&e)))?;
            Ok(Some((
                from - ch.first_page,
                to - ch.first_page,
                filled as u64,
            )))
        })?;
        if let Some(r) = served {
            return Ok(r);
        }
        let piece = (FAULT_PIECE / self.page_size).max(1);
        let a = (page / piece * piece).max(ch.first_page) - ch.first_page;
        let b = (a + piece).min(n);
        let filled = self.fill_pages(tracker, cache, c, a, b)?;
        Ok((a, b, filled))
    }
}

/// The order the fill thread takes chunks in (after those the guest touched): the chunks of hot
/// records first, in file order (about the order the guest wrote them during the save, so
/// likely what it touches first again), then every other one in file order.
pub(super) fn fill_order(chunks: &[Chunk], hot: impl Fn(&Chunk) -> bool) -> Vec<u32> {
    let (mut first, rest): (Vec<u32>, Vec<u32>) =
        (0..chunks.len() as u32).partition(|&c| hot(&chunks[c as usize]));
    first.extend(rest);
    first
}
