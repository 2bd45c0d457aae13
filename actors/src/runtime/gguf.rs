//! The checks a GGUF file passes before candle reads it.
//!
//! A pushed file is untrusted, and candle's reader holds every metadata value in memory as
//! an enum of about 32 bytes: one byte of a `u8` array in the file becomes 32 in memory, so a
//! 512 MiB push could ask the server (and every agent) for 16 GiB. Its element counts are
//! also multiplied unchecked. This walks the header over the bytes as they are, allocating
//! nothing per value, and refuses what would cost more than a real model's file does
//! before anything else reads it.

/// Most metadata array elements a file may hold. A large vocabulary's tokens, scores,
/// token types and merges, as llama.cpp writes them, come to under a million; candle holds
/// each element as a 32-byte value, so this bounds that at 64 MiB.
pub const METADATA_ELEMENTS_MAX: u64 = 2 << 20;

/// Most tensors a file may hold: a 70B-parameter llama has under a thousand.
pub const TENSORS_MAX: u64 = 1 << 16;

/// Most metadata entries a file may hold: llama.cpp writes a few dozen. candle keeps each
/// as a key and a value of about 90 bytes.
pub const METADATA_ENTRIES_MAX: u64 = 1 << 16;

/// Most dimensions of one tensor (ggml's `GGML_MAX_DIMS`).
const DIMENSIONS_MAX: u32 = 4;

/// Most elements a tensor may hold per byte of the file: ggml's smallest quantizations
/// store 1.5 bits an element, so no real tensor comes near 8.
const ELEMENTS_PER_FILE_BYTE_MAX: u64 = 8;

/// A value type's tag in the file.
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// Why a GGUF file was refused.
pub type Refusal = String;

/// Walks the header of `bytes`, a GGUF file (versions 1 to 3), and refuses one that is
/// malformed, cut short, or past the limits above.
pub fn check_header(bytes: &[u8]) -> Result<(), Refusal> {
    let mut reader = Reader {
        bytes,
        at: 0,
        wide: false,
    };
    if reader.u32()? != u32::from_le_bytes(*b"GGUF") {
        return Err("no GGUF magic".into());
    }
    let version = reader.u32()?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version}; versions 1 to 3 are read"));
    }
    // Version 1 wrote counts and lengths as u32; later versions as u64.
    reader.wide = version > 1;
    let tensors = reader.length()?;
    let entries = reader.length()?;
    if tensors > TENSORS_MAX {
        return Err(format!("{tensors} tensors; at most {TENSORS_MAX} are read"));
    }
    if entries > METADATA_ENTRIES_MAX {
        return Err(format!(
            "{entries} metadata entries; at most {METADATA_ENTRIES_MAX} are read"
        ));
    }
    let mut elements = 0u64;
    for _ in 0..entries {
        let key = reader.string()?;
        let kind = reader.u32()?;
        if key == b"general.alignment" {
            // candle divides by it; ggml wants a power of two.
            let alignment = reader.integer(kind)?;
            if !alignment.is_some_and(|alignment| alignment > 0 && alignment.is_power_of_two()) {
                return Err("general.alignment is not a power of two".into());
            }
        } else if kind == ARRAY {
            let item_kind = reader.u32()?;
            let count = reader.length()?;
            elements = elements.saturating_add(count);
            if elements > METADATA_ELEMENTS_MAX {
                return Err(format!(
                    "over {METADATA_ELEMENTS_MAX} metadata array elements; a model's \
                     vocabulary takes under a million"
                ));
            }
            if item_kind == ARRAY {
                return Err("a metadata array of arrays".into());
            }
            for _ in 0..count {
                reader.value(item_kind)?;
            }
        } else {
            reader.value(kind)?;
        }
    }
    let elements_max = (bytes.len() as u64).saturating_mul(ELEMENTS_PER_FILE_BYTE_MAX);
    for _ in 0..tensors {
        let name = String::from_utf8_lossy(reader.string()?).into_owned();
        let dimensions = reader.u32()?;
        if dimensions > DIMENSIONS_MAX {
            return Err(format!("tensor {name:?} has {dimensions} dimensions"));
        }
        // Checked over every dimension, zeros too: candle multiplies them unchecked, in
        // reverse order, so [0, 2^40, 2^40] overflows there though its product is 0.
        let mut count = Some(1u64);
        let mut empty = false;
        for _ in 0..dimensions {
            let dimension = reader.length()?;
            empty |= dimension == 0;
            count = count.and_then(|count| count.checked_mul(dimension.max(1)));
        }
        // candle reads a tensor of no elements from a dangling pointer: no model has one.
        if empty {
            return Err(format!("tensor {name:?} has a dimension of 0: no elements"));
        }
        if count.is_none_or(|count| count > elements_max) {
            return Err(format!(
                "tensor {name:?} claims more elements than the file could hold"
            ));
        }
        reader.take(4 + 8)?; // its ggml type and offset
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Counts and lengths are u64 (versions 2 and 3) rather than u32.
    wide: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: u64) -> Result<&'a [u8], Refusal> {
        let end = usize::try_from(length)
            .ok()
            .and_then(|length| self.at.checked_add(length))
            .filter(|&end| end <= self.bytes.len())
            .ok_or("the header runs past the end of the file")?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn length(&mut self) -> Result<u64, Refusal> {
        if !self.wide {
            return Ok(u64::from(self.u32()?));
        }
        let bytes = self.take(8)?;
        let mut word = [0; 8];
        word.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(word))
    }

    fn string(&mut self) -> Result<&'a [u8], Refusal> {
        let length = self.length()?;
        self.take(length)
    }

    /// An integer value of type `kind` (any width, signed or not; a negative one is
    /// `None`), or `None` for a value of another type, stepped over.
    fn integer(&mut self, kind: u32) -> Result<Option<u64>, Refusal> {
        let value = match kind {
            0 => u64::from(self.take(1)?[0]),
            1 => u64::try_from(i8::from_le_bytes([self.take(1)?[0]]))
                .ok()
                .unwrap_or(0),
            2 => {
                let bytes = self.take(2)?;
                u64::from(u16::from_le_bytes([bytes[0], bytes[1]]))
            }
            3 => {
                let bytes = self.take(2)?;
                u64::try_from(i16::from_le_bytes([bytes[0], bytes[1]])).unwrap_or(0)
            }
            4 => u64::from(self.u32()?),
            5 => u64::try_from(self.u32()? as i32).unwrap_or(0),
            ARRAY => return Err("general.alignment is an array".into()),
            other => {
                self.value(other)?;
                return Ok(None);
            }
        };
        Ok(Some(value))
    }

    /// Steps over one value of type `kind` that is not an array.
    fn value(&mut self, kind: u32) -> Result<(), Refusal> {
        let width = match kind {
            0 | 1 | 7 => 1, // u8, i8, bool
            2 | 3 => 2,     // u16, i16
            4..=6 => 4,     // u32, i32, f32
            10..=12 => 8,   // u64, i64, f64
            STRING => return self.string().map(|_| ()),
            other => return Err(format!("metadata value type {other} is not GGUF's")),
        };
        self.take(width).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version-3 header with `entries` as metadata and one tensor of `dimensions`.
    fn header(entries: &[(&str, u32, Vec<u8>)], dimensions: &[u64]) -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend((entries.len() as u64).to_le_bytes());
        for (key, kind, value) in entries {
            bytes.extend((key.len() as u64).to_le_bytes());
            bytes.extend(key.as_bytes());
            bytes.extend(kind.to_le_bytes());
            bytes.extend(value);
        }
        bytes.extend(1u64.to_le_bytes());
        bytes.push(b'w');
        bytes.extend((dimensions.len() as u32).to_le_bytes());
        for dimension in dimensions {
            bytes.extend(dimension.to_le_bytes());
        }
        bytes.extend(0u32.to_le_bytes()); // F32
        bytes.extend(0u64.to_le_bytes());
        bytes
    }

    fn u8_array(count: u64) -> Vec<u8> {
        let mut value = 0u32.to_le_bytes().to_vec();
        value.extend(count.to_le_bytes());
        value.extend(std::iter::repeat_n(7u8, count as usize));
        value
    }

    #[test]
    fn a_plain_header_passes() {
        let name = [4u64.to_le_bytes().to_vec(), b"tiny".to_vec()].concat();
        let mut bytes = header(
            &[
                ("general.name", STRING, name),
                ("general.alignment", 4, 32u32.to_le_bytes().to_vec()),
                ("tokens", ARRAY, u8_array(1_000)),
            ],
            &[4, 2],
        );
        bytes.extend([0; 32]);
        assert_eq!(check_header(&bytes), Ok(()));
    }

    /// Regression: a 3 MiB file of one `u8` array made candle's reader hold 96 MiB; at the
    /// 512 MiB a push allows, 16 GiB.
    #[test]
    fn a_metadata_array_past_the_limit_is_refused_before_it_is_read() {
        let bytes = header(
            &[("filler", ARRAY, u8_array(METADATA_ELEMENTS_MAX + 1))],
            &[1],
        );
        let refused = check_header(&bytes).unwrap_err();
        assert!(refused.contains("metadata array elements"), "{refused}");
    }

    #[test]
    fn a_tensor_claiming_more_elements_than_the_file_holds_is_refused() {
        // 2^32 × 2^32 wraps to 0 in an unchecked product.
        let bytes = header(&[], &[1 << 32, 1 << 32]);
        let refused = check_header(&bytes).unwrap_err();
        assert!(
            refused.contains("more elements than the file could hold"),
            "{refused}"
        );
        let refused = check_header(&header(&[], &[1, 1, 1, 1, 1])).unwrap_err();
        assert!(refused.contains("5 dimensions"), "{refused}");
    }

    /// Regression: an alignment of 0 passed, and candle's reader divided by it.
    #[test]
    fn an_alignment_that_is_not_a_power_of_two_is_refused() {
        for alignment in [0u32, 3, 48] {
            let bytes = header(
                &[("general.alignment", 4, alignment.to_le_bytes().to_vec())],
                &[1],
            );
            let refused = check_header(&bytes).unwrap_err();
            assert!(refused.contains("power of two"), "{alignment}: {refused}");
        }
        let mut bytes = header(
            &[("general.alignment", 4, 64u32.to_le_bytes().to_vec())],
            &[1],
        );
        bytes.extend([0; 64]);
        assert_eq!(check_header(&bytes), Ok(()));
    }

    #[test]
    fn a_tensor_whose_dimensions_overflow_past_a_zero_is_refused() {
        let refused = check_header(&header(&[], &[3, 1 << 40, 1 << 40])).unwrap_err();
        assert!(
            refused.contains("more elements than the file could hold"),
            "{refused}"
        );
    }

    /// Regression: candle reads a tensor of no elements through a dangling pointer, which
    /// aborts a debug build (and is undefined behaviour in a release one).
    #[test]
    fn a_tensor_with_no_elements_is_refused() {
        for dimensions in [vec![0], vec![0, 32], vec![0, 1 << 40, 1 << 40]] {
            let refused = check_header(&header(&[], &dimensions)).unwrap_err();
            assert!(
                refused.contains("a dimension of 0"),
                "{dimensions:?}: {refused}"
            );
        }
    }

    #[test]
    fn an_array_of_arrays_and_an_unknown_value_type_are_refused() {
        let mut nested = ARRAY.to_le_bytes().to_vec();
        nested.extend(1u64.to_le_bytes());
        let refused = check_header(&header(&[("nested", ARRAY, nested)], &[1])).unwrap_err();
        assert!(refused.contains("array of arrays"), "{refused}");
        let refused = check_header(&header(&[("odd", 13, vec![0; 8])], &[1])).unwrap_err();
        assert!(refused.contains("type 13"), "{refused}");
    }

    proptest! {
        /// However a header is cut or damaged, it is refused or passed, never a panic, and
        /// a header cut short is always refused.
        #[test]
        fn a_damaged_header_is_refused_not_panicked_on(
            cut in 0usize..120,
            flips in proptest::collection::vec((0usize..120, any::<u8>()), 0..4),
        ) {
            let mut bytes = header(&[("tokens", ARRAY, u8_array(16))], &[4, 2]);
            let whole = bytes.len();
            for (at, byte) in flips {
                if let Some(slot) = bytes.get_mut(at) {
                    *slot = byte;
                }
            }
            let _ = check_header(&bytes);
            // Nor does what reads the file once it passes.
            let _ = crate::runtime::WeightsFile::Gguf(&bytes)
                .loaded_bytes(crate::runtime::Architecture::Llama);
            let cut = cut.min(whole - 1);
            let original = header(&[("tokens", ARRAY, u8_array(16))], &[4, 2]);
            prop_assert!(check_header(&original[..cut]).is_err());
        }
    }
}
