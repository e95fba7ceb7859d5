//! A reusable byte buffer whose data starts on a 4096-byte boundary, as O_DIRECT reads and
//! writes require. The vector is over-allocated and its aligned part used, so no unsafe
//! allocation is needed.

/// Alignment of the data (covers 512- and 4096-byte logical sectors).
pub const ALIGN: usize = 4096;

#[derive(Default)]
pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Makes room for `len` bytes; the contents are unspecified until written.
    pub fn prepare(&mut self, len: usize) {
        if self.vec.len() < len + ALIGN {
            self.vec = vec![0u8; len + ALIGN];
        }
        let addr = self.vec.as_ptr() as usize;
        self.start = (ALIGN - addr % ALIGN) % ALIGN;
        self.len = len;
    }

    pub fn data(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_aligned_and_sized() {
        let mut b = AlignedBuf::default();
        for len in [0, 1, 4096, 262_144, 100] {
            b.prepare(len);
            assert_eq!(b.data().len(), len);
            assert_eq!(b.data().as_ptr() as usize % ALIGN, 0);
        }
    }
}
