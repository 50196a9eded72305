//! What to save when: linear scan, fault priority, zero pages, throttling, and the snapshot file format.
