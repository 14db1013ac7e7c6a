//! A model of what each 512-byte sector may hold across flushes and power cuts, shared by the
//! crash and model tests. Every write fills each 4-byte word of its sectors with a tag.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};

/// The granularity of the model.
pub const SECTOR: u64 = 512;
/// The tag a discard leaves: anything may be read there.
pub const UNDEFINED: u32 = u32::MAX;

/// Sector contents: a tag (0 = zeros) written into every 4-byte word of the sector.
pub fn fill(buf: &mut [u8], tag: u32) {
    for w in buf.chunks_exact_mut(4) {
        w.copy_from_slice(&tag.to_le_bytes());
    }
}

pub fn tag_of(sector: &[u8]) -> Option<u32> {
    let t = u32::from_le_bytes(sector[..4].try_into().unwrap());
    sector
        .chunks_exact(4)
        .all(|w| u32::from_le_bytes(w.try_into().unwrap()) == t)
        .then_some(t)
}

/// What each sector may hold: the durable value at the last completed flush, plus every value
/// written (or allowed by a discard) since.
#[derive(Default, Clone)]
pub struct Model {
    pub durable: HashMap<u64, u32>,
    pub since: HashMap<u64, Vec<u32>>,
    pub undefined: HashSet<u64>,
}

impl Model {
    pub fn set(&mut self, off: u64, len: u64, tag: u32) {
        for s in off / SECTOR..(off + len) / SECTOR {
            self.since.entry(s).or_default().push(tag);
        }
    }
    pub fn flushed(&mut self) {
        for (s, tags) in self.since.drain() {
            let last = *tags.last().unwrap();
            if last == UNDEFINED {
                self.undefined.insert(s);
            } else {
                self.undefined.remove(&s);
            }
            self.durable
                .insert(s, if last == UNDEFINED { 0 } else { last });
        }
    }
    pub fn allows(&self, s: u64, tag: u32) -> bool {
        let d = self.durable.get(&s).copied().unwrap_or(0);
        if tag == d {
            return true;
        }
        if self.undefined.contains(&s) {
            return true;
        }
        match self.since.get(&s) {
            Some(tags) => tags.contains(&tag) || tags.contains(&UNDEFINED),
            None => false,
        }
    }
}

impl Model {
    /// After reading back a sector (and checking it is allowed), it holds exactly that.
    pub fn settle(&mut self, s: u64, tag: u32) {
        self.since.remove(&s);
        self.undefined.remove(&s);
        self.durable.insert(s, tag);
    }
}
