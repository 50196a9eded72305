//! The threads of a lazy restore: the fault thread (demand faults first, one checked piece at a
//! time from records in pieces, zstd or raw, see `pieces`, else through a small cache of decoded
//! records), the fill thread (touched pieces first, then hot records, then file order, yielding
//! to faults; untouched blocks moved in as whole huge pages), and the end (unregister, then
//! collapse the blocks that are not huge pages back into huge pages).

use super::*;

/// The decoded pages of the last few records read: the pieces of a fault and the rest of its
/// chunk (filled later, between other faults), or consecutive chunks of one record, decode it
/// once.
#[derive(Debug, Default)]
pub(super) struct DecodeCache {
    /// ((layer, record), pages, last use), most recent use highest.
    slots: Vec<((u16, u32), Vec<u8>, u64)>,
    tick: u64,
}

/// The key of an empty [`DecodeCache`] slot.
const NO_RECORD: (u16, u32) = (u16::MAX, u32::MAX);

/// A record error of chunk `ch`, naming its layer when the snapshot is a chain.
pub(super) fn layer_error(s: &Shared, ch: &Chunk, e: &FormatError) -> String {
    if s.chain.layers().len() == 1 {
        return chain(e);
    }
    let l = &s.chain.layers()[ch.layer as usize];
    format!(
        "layer {} ({}): {}",
        ch.layer + 1,
        l.path.display(),
        chain(e)
    )
}

/// Records a [`DecodeCache`] keeps decoded (2 MiB each at most in practice).
const DECODED_RECORDS: usize = 4;

impl DecodeCache {
    /// A cache whose buffers already hold `bytes` each, touched: the first faults do not pay
    /// for faulting in fresh heap memory (about a millisecond per 2 MiB here).
    pub(super) fn warm(bytes: usize) -> Self {
        let slots = (0..DECODED_RECORDS)
            .map(|_| {
                // Not zeros: a zeroed allocation comes untouched from the kernel.
                (NO_RECORD, vec![0xa5u8; bytes], 0)
            })
            .collect();
        DecodeCache { slots, tick: 0 }
    }

    /// The decoded pages of chunk `ch`'s record (read from its layer unless cached).
    pub(super) fn get(&mut self, s: &Shared, ch: &Chunk) -> Result<&[u8], LazyFailure> {
        self.tick += 1;
        let key = (ch.layer, ch.record);
        let at = match self.slots.iter().position(|s| s.0 == key) {
            Some(at) => at,
            None => {
                let at = if self.slots.len() < DECODED_RECORDS {
                    self.slots.push((NO_RECORD, Vec::new(), 0));
                    self.slots.len() - 1
                } else {
                    let lru = self.slots.iter().enumerate().min_by_key(|(_, s)| s.2);
                    lru.map_or(0, |(i, _)| i)
                };
                // A record of the same length reuses the buffer as it is.
                let slot = &mut self.slots[at];
                slot.0 = NO_RECORD;
                s.reader(ch)
                    .read_record_at(ch.record as usize, &mut slot.1)
                    .map_err(|e| LazyFailure::Record(layer_error(s, ch, &e)))?;
                slot.0 = key;
                at
            }
        };
        self.slots[at].2 = self.tick;
        Ok(&self.slots[at].1)
    }
}

pub(super) fn fault_thread(s: &Shared) {
    let Some(tracker) = s.tracker() else {
        return;
    };
    let mut cache = DecodeCache::warm(BLOCK as usize);
    let mut faults: Vec<MissingFault> = Vec::new();
    let mut waits: Vec<Duration> = Vec::new();
    while !s.stop.load(Ordering::SeqCst) {
        faults.clear();
        let served = tracker
            .wait_faults(FAULT_POLL, &mut faults)
            .map_err(|e| LazyFailure::Fill(chain(&e)))
            .and_then(|_| serve_faults(s, &tracker, &mut cache, &faults, &mut waits));
        if let Err(e) = served {
            s.fault_busy.store(false, Ordering::SeqCst);
            if !s.finishing.load(Ordering::SeqCst) {
                s.fail(e);
            }
            return;
        }
    }
}

/// Serves a batch of faults: the piece around each faulting page (its toucher runs on at once),
/// or a wake if its chunk is resident; the rest of the chunk goes to the fill thread, first.
fn serve_faults(
    s: &Shared,
    tracker: &MissingTracker,
    cache: &mut DecodeCache,
    faults: &[MissingFault],
    waits: &mut Vec<Duration>,
) -> Result<(), LazyFailure> {
    if faults.is_empty() {
        return Ok(());
    }
    let read_at = Instant::now();
    s.fault_busy.store(true, Ordering::SeqCst);
    waits.clear();
    for f in faults {
        let n = serve_fault(s, tracker, cache, f)?;
        s.fault_filled.fetch_add(n, Ordering::Relaxed);
        waits.push(read_at.elapsed());
    }
    s.fault_busy.store(false, Ordering::SeqCst);
    s.faults.fetch_add(faults.len() as u64, Ordering::Relaxed);
    let mut w = lock(&s.waits);
    w.first_fault.get_or_insert(read_at.duration_since(s.t0));
    for d in waits.iter() {
        w.samples.add(*d);
    }
    Ok(())
}

/// One missing fault; returns the bytes it filled.
fn serve_fault(
    s: &Shared,
    tracker: &MissingTracker,
    cache: &mut DecodeCache,
    f: &MissingFault,
) -> Result<u64, LazyFailure> {
    let page = s.page_of(f.addr);
    let chunk = page.and_then(|p| s.chunk_of(p));
    let (Some(page), Some(c)) = (page, chunk) else {
        // Not guest memory we know (cannot happen: only guest memory is registered).
        return Ok(0);
    };
    let ch = s.chunks[c];
    let n = u64::from(ch.pages);
    s.touch(c);
    if s.state(c) == RESIDENT {
        // Read after someone else filled the page (that fill woke the toucher, or will have).
        let ps = s.page_size as usize;
        tracker
            .wake(HostRange::new(f.addr & !(ps - 1), ps))
            .map_err(|e| LazyFailure::Fill(chain(&e)))?;
        return Ok(0);
    }
    if ch.zero {
        // One ioctl of zero pages for all of it: no piece needed.
        let filled = s.fill_pages(tracker, cache, c, 0, n)?;
        s.mark_resident(c);
        return Ok(filled);
    }
    let (a, b, filled) = s.fill_fault_piece(tracker, cache, c, page)?;
    if a == 0 && b == n {
        s.mark_resident(c);
    } else if s.state(c) == MISSING {
        // The fill thread completes it next (FILLING: it is doing so already).
        let mut hot = lock(&s.hot);
        if hot.last() != Some(&(c as u32)) {
            hot.push(c as u32);
        }
    }
    Ok(filled)
}

/// Fills chunk `c` whole if it is still missing: with the rest of its block in one move when
/// the block can be moved whole, else by copies.
fn fill_chunk(
    s: &Shared,
    tracker: &MissingTracker,
    cache: &mut DecodeCache,
    stage: &mut Option<HugeBlock>,
    c: usize,
) -> Result<(), LazyFailure> {
    let b = s.block_of[c];
    if b != NO_BLOCK && !s.no_move.load(Ordering::Relaxed) {
        if let Some(stage) = stage {
            return fill_block(s, tracker, cache, stage, b as usize);
        }
    }
    if !s.claim(c, FILLING) {
        return Ok(());
    }
    fill_claimed(s, tracker, cache, c)
}

/// Fills chunk `c`, which this thread claimed (FILLING), by copies, and marks it resident.
fn fill_claimed(
    s: &Shared,
    tracker: &MissingTracker,
    cache: &mut DecodeCache,
    c: usize,
) -> Result<(), LazyFailure> {
    if !s.chunks[c].zero {
        let t = Instant::now();
        cache.get(s, &s.chunks[c])?;
        s.fill_time(0, t);
    }
    let t = Instant::now();
    let n = s.fill_pages(tracker, cache, c, 0, u64::from(s.chunks[c].pages))?;
    s.fill_time(2, t);
    s.fill_filled.fetch_add(n, Ordering::Relaxed);
    s.mark_resident(c);
    Ok(())
}

/// Fills block `b`: if no fault touched it and all its chunks are still missing, its bytes are
/// assembled in the staging huge page and moved in at once (one huge page, waking whoever
/// waits); otherwise, or if a fault fills a piece of it meanwhile (the move then stops at that
/// piece), its chunks are filled by copies (pages that are there are skipped), and the end
/// collapses it.
fn fill_block(
    s: &Shared,
    tracker: &MissingTracker,
    cache: &mut DecodeCache,
    stage: &mut HugeBlock,
    b: usize,
) -> Result<(), LazyFailure> {
    let blk = s.blocks[b];
    let members = &s.by_page[blk.chunks.0 as usize..blk.chunks.1 as usize];
    // Claim every chunk, in page order; one that is not missing any more (a fault filled it) or
    // a touched block makes the block piecewise.
    let mut claimed = 0;
    while claimed < members.len()
        && !s.touched[b].load(Ordering::SeqCst)
        && s.claim(members[claimed] as usize, FILLING)
    {
        claimed += 1;
    }
    if claimed < members.len() {
        // The first `claimed` are this thread's already; the others only if still missing.
        for (k, &c) in members.iter().enumerate() {
            if k < claimed || s.claim(c as usize, FILLING) {
                fill_claimed(s, tracker, cache, c as usize)?;
            }
        }
        return Ok(());
    }
    // The staging page is empty (a fresh mapping, or emptied by the last move or clear), so
    // zero chunks need no bytes once it is populated with zeros.
    let ps = s.page_size;
    // The first touch of the empty staging page: the kernel allocates and zeroes a huge page
    // (populated ahead of the writes, so that no page of it is left a hole to move).
    let t = Instant::now();
    let _ = stage.populate();
    s.fill_time(1, t);
    let whole = |c: u32| {
        let e = s.entry(&s.chunks[c as usize]);
        e.first_page == blk.first_page && u64::from(e.page_count) * ps == BLOCK
    };
    if let [c] = *members {
        if whole(c) {
            // The block is one record: read (and decode) it straight into the staging page.
            let t = Instant::now();
            let ch = &s.chunks[c as usize];
            s.reader(ch)
                .read_record_into(ch.record as usize, stage.as_mut_slice())
                .map_err(|e| LazyFailure::Record(layer_error(s, ch, &e)))?;
            s.fill_time(0, t);
            return move_block(s, tracker, stage, blk, members);
        }
    }
    for &c in members {
        let ch = s.chunks[c as usize];
        if ch.zero {
            continue;
        }
        let t = Instant::now();
        let data = cache.get(s, &ch)?;
        s.fill_time(0, t);
        let t = Instant::now();
        let entry = s.entry(&ch);
        let from = ((ch.first_page - entry.first_page) * ps) as usize;
        let at = ((ch.first_page - blk.first_page) * ps) as usize;
        let len = (u64::from(ch.pages) * ps) as usize;
        stage.as_mut_slice()[at..at + len].copy_from_slice(&data[from..from + len]);
        s.fill_time(1, t);
    }
    move_block(s, tracker, stage, blk, members)
}

/// Moves the staged block `blk` (its chunks `members`, all claimed) in; if that stops short,
/// copies the rest from the staging page.
fn move_block(
    s: &Shared,
    tracker: &MissingTracker,
    stage: &mut HugeBlock,
    blk: Block,
    members: &[u32],
) -> Result<(), LazyFailure> {
    let ps = s.page_size;
    let t = Instant::now();
    let dst = s.host(blk.first_page, BLOCK / ps);
    match tracker.move_in(dst, stage) {
        Ok(()) => {
            s.fill_time(2, t);
            s.fill_filled.fetch_add(BLOCK, Ordering::Relaxed);
            s.fill_moved.fetch_add(BLOCK, Ordering::Relaxed);
            for &c in members {
                s.mark_resident(c as usize);
            }
            return Ok(());
        }
        // A fault filled a piece meanwhile: what moved is in place, the rest is still staged.
        Err(MissingError::DestinationNotMissing { moved, .. }) => {
            s.move_races.fetch_add(1, Ordering::Relaxed);
            s.fill_filled.fetch_add(moved as u64, Ordering::Relaxed);
        }
        // Not expected (the block was checked to take moves): copy from now on.
        Err(_) => s.no_move.store(true, Ordering::Relaxed),
    }
    // Copy what is still missing from the staging page (its moved-out pages read as zeros, but
    // their guest pages exist and are skipped), zero chunks as zero pages.
    let fill_err = |e: MissingError| LazyFailure::Fill(chain(&e));
    for &c in members {
        let ch = s.chunks[c as usize];
        let range = s.host(ch.first_page, u64::from(ch.pages));
        let n = if ch.zero {
            tracker.fill_zero(range).map_err(fill_err)?
        } else {
            let at = ((ch.first_page - blk.first_page) * ps) as usize;
            tracker
                .fill(range, &stage.as_mut_slice()[at..at + range.len])
                .map_err(fill_err)?
        };
        s.fill_filled.fetch_add(n as u64, Ordering::Relaxed);
        s.mark_resident(c as usize);
    }
    s.fill_time(2, t);
    // Small pages may be left in it: start the next block on a fresh huge page.
    stage.clear();
    Ok(())
}

pub(super) fn fill_thread(s: &Shared) {
    let Some(tracker) = s.tracker() else {
        return;
    };
    let mut cache = DecodeCache::default();
    // Without staging memory every block is copied (and collapsed at the end).
    let mut stage = (!s.blocks.is_empty())
        .then(HugeBlock::new)
        .and_then(Result::ok);
    let mut next = 0;
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Faults first: let the fault thread have the CPU while it serves.
        if s.fault_busy.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Chunks the guest touched first (the most recent first), then hot records, then file
        // order (`fill_order`).
        let c = match lock(&s.hot).pop() {
            Some(c) => c as usize,
            None if next < s.fill_order.len() => {
                next += 1;
                s.fill_order[next - 1] as usize
            }
            None => break,
        };
        if let Err(e) = fill_chunk(s, &tracker, &mut cache, &mut stage, c) {
            return s.fail(e);
        }
    }
    drop(cache);
    drop(stage);
    // Every chunk was filled here, or whole by a fault (a fault never leaves one half done for
    // itself: what it does not fill is queued here), so all are resident.
    while s.resident.load(Ordering::SeqCst) < s.total {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    finish(s, &tracker);
}

/// Everything is resident: unregister (the fault thread stops), collapse the blocks that hold
/// data into huge pages, and report.
fn finish(s: &Shared, tracker: &MissingTracker) {
    let resident_at = s.t0.elapsed();
    // The fault thread ends; faults read meanwhile find their chunks resident, and anyone still
    // blocked is woken by the unregistration and finds its page there.
    s.finishing.store(true, Ordering::SeqCst);
    s.stop.store(true, Ordering::SeqCst);
    if let Err(e) = tracker.unregister_all() {
        return s.fail(LazyFailure::Fill(chain(&e)));
    }
    lock(&s.end).resident_at = Some(resident_at);
    s.end_cv.notify_all();
    let huge_bytes = || -> u64 {
        s.regions
            .iter()
            .map(|r| {
                ram_saver::pagemap::huge_ranges(r.host, r.pages as usize * s.page_size as usize)
                    .iter()
                    .map(|(a, b)| (b - a) as u64)
                    .sum::<u64>()
            })
            .sum()
    };
    let before = huge_bytes();
    let block_pages = BLOCK / s.page_size;
    let mut data_blocks: Vec<u64> = s
        .chunks
        .iter()
        .filter(|c| !c.zero)
        .map(|c| c.first_page / block_pages * block_pages)
        .filter(|&first| {
            s.regions
                .iter()
                .any(|r| first >= r.first_page && first + block_pages <= r.first_page + r.pages)
        })
        .collect();
    data_blocks.sort_unstable();
    data_blocks.dedup();
    // Blocks with data that are not huge pages (a call that fails may still collapse some):
    // those the fill copied (a fault filled a piece first, or moves were not possible).
    let small = || -> Vec<u64> {
        let huge: Vec<(usize, usize)> = s
            .regions
            .iter()
            .flat_map(|r| {
                ram_saver::pagemap::huge_ranges(r.host, r.pages as usize * s.page_size as usize)
            })
            .collect();
        data_blocks
            .iter()
            .copied()
            .filter(|&first| {
                let h = s.host(first, block_pages);
                !huge.iter().any(|&(a, b)| a <= h.start && h.end() <= b)
            })
            .collect()
    };
    let mut left = small();
    // Runs of adjacent blocks inside one region, COLLAPSE_BATCH blocks per call at most.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &first in &left {
        match runs.last_mut() {
            Some((start, n))
                if *start + *n * block_pages == first
                    && *n < COLLAPSE_BATCH
                    && s.regions.iter().any(|r| {
                        *start >= r.first_page && first + block_pages <= r.first_page + r.pages
                    }) =>
            {
                *n += 1
            }
            _ => runs.push((first, 1)),
        }
    }
    let mut refused = 0;
    let mut gave_up = false;
    let mut busy = Duration::ZERO;
    for (k, &(first, n)) in runs.iter().enumerate() {
        // Memory the kernel will not collapse at all (e.g. shmem without huge pages): stop.
        if k == COLLAPSE_PROBE && refused == k {
            gave_up = true;
            break;
        }
        // Not while a save runs (see `LazyRestore::hold_collapse`).
        let Some(_call) = s.collapse.turn(&s.quit) else {
            break;
        };
        let t = Instant::now();
        if tracker
            .collapse_huge(s.host(first, n * block_pages))
            .is_err()
        {
            refused += 1;
        }
        busy += t.elapsed();
    }
    // One more try, block by block, for those that failed (often a transient EAGAIN), unless
    // the kernel refused everything.
    if !runs.is_empty() {
        left = small();
    }
    if !gave_up && !left.is_empty() && (left.len() as u64) <= COLLAPSE_RETRY_MAX {
        for &first in &left {
            let Some(_call) = s.collapse.turn(&s.quit) else {
                break;
            };
            let t = Instant::now();
            let _ = tracker.collapse_huge(s.host(first, block_pages));
            busy += t.elapsed();
        }
        left = small();
    }
    let failures = left.len() as u64;
    let collapse = busy;
    let after = huge_bytes();
    // Let go of the registration's memory handles now (nothing is registered any more).
    lock(&s.tracker).take();
    let mut end = lock(&s.end);
    end.thp_before = Some(before);
    end.thp_after = Some(after);
    end.collapse = Some(collapse);
    end.collapse_failures = failures;
    if end.failed.is_none() {
        end.done = true;
    }
    s.end_cv.notify_all();
}
