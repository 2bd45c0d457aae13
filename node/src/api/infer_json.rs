//! A fast reader for the common shape of an OIP v2 infer request: numeric tensors
//! (`FP32`, `INT64`) with `name`, `shape`, `datatype` and `data` and nothing else. Numbers
//! go straight into the tensor's typed vector in one pass; when `data` comes before
//! `datatype` they are read as FP32, and read again in the rare case the type is INT64.
//!
//! Anything else gives `None` — BYTES tensors, strings with escapes, `parameters`, fields it
//! does not know, a number past FP32's range, a malformed body — and the caller reads the body with serde instead
//! ([`super::oip`]), which also words every error. So this reader only has to be right
//! about what it accepts, and a property test holds it to serde's answer on those.
//!
//! Why it exists: serving a small model, reading a request's numbers through serde (a
//! visitor call and an enum per element, then a second pass into `f32`) was the largest
//! single cost of a request, about a third of the gateway's CPU.

use shoal_actors::tensor::{NamedTensor, TensorData};

/// An infer request read into tensors (by this reader or by serde's path).
#[derive(Debug, Default, PartialEq)]
pub struct Request {
    pub id: Option<String>,
    pub inputs: Vec<NamedTensor>,
    /// The outputs asked for; all when empty.
    pub outputs: Vec<Wanted>,
    /// Every output as binary tensor data.
    pub binary_output: bool,
}

/// An output a request asks for by name.
#[derive(Debug, PartialEq)]
pub struct Wanted {
    pub name: String,
    /// Answered as binary tensor data.
    pub binary: bool,
}

impl Request {
    /// Whether the answer carries the output `name`.
    pub fn wants(&self, name: &str) -> bool {
        self.outputs.is_empty() || self.outputs.iter().any(|wanted| wanted.name == name)
    }

    /// Whether the output `name` is answered as binary tensor data.
    pub fn binary(&self, name: &str) -> bool {
        self.binary_output
            || self
                .outputs
                .iter()
                .any(|wanted| wanted.binary && wanted.name == name)
    }
}

/// Deepest nesting of a tensor's `data` arrays the fast path follows.
const DATA_DEPTH_MAX: usize = 32;

/// The bytes a number and its comma are guessed to take when nothing says how many
/// numbers a `data` array holds. A float as clients write one takes 8 to 20; shorter
/// numbers cost the vector a reallocation or two, and longer ones leave room that
/// [`fit`] gives back.
const GUESSED_NUMBER_BYTES: usize = 8;

/// Gives back the room a guessed capacity left unused when it is most of the vector: a
/// request's tensors wait in a batch queue, and a queue of them should not hold more
/// than twice their size.
fn fit<T>(values: &mut Vec<T>) {
    if values.capacity() > 2 * values.len() {
        values.shrink_to_fit();
    }
}

/// Reads `body` when it has the common shape; `None` when serde must.
pub fn read(body: &[u8]) -> Option<Request> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    let request = cursor.request()?;
    cursor.skip_space();
    (cursor.at == body.len()).then_some(request)
}

/// The number of elements a shape holds; `None` past `usize`.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The shape that a tensor's nested `data` arrays spell out, gathered as they are read (at
/// each array's end, never per element) and checked against the tensor's `shape` once
/// both are known: `data` may be flat whatever the shape, or nested exactly as the shape
/// (`[[1, 2, 3, 4]]` for `[1, 4]`, never `[[1, 2], [3, 4]]`). Both readers keep one.
#[derive(Clone, Debug, PartialEq)]
pub struct Nesting {
    /// The length of the outermost array.
    outer_length: usize,
    /// The length of the first array met at each depth below the outermost (index 0 is
    /// depth 1); empty for flat data, so flat data allocates nothing here.
    inner_lengths: Vec<Option<usize>>,
    /// The depth of the arrays that hold numbers rather than arrays (the first met).
    leaf_depth: Option<usize>,
    /// Every array as long as the first of its depth, numbers only at one depth, and no
    /// array holding both numbers and arrays.
    even: bool,
}

impl Default for Nesting {
    fn default() -> Nesting {
        Nesting {
            outer_length: 0,
            inner_lengths: Vec::new(),
            leaf_depth: None,
            even: true,
        }
    }
}

impl Nesting {
    /// An array at `depth` (0: the outermost) closed after `items` elements, `arrays` of
    /// which were arrays.
    pub fn close(&mut self, depth: usize, items: usize, arrays: usize) {
        if arrays == 0 {
            match self.leaf_depth {
                None => self.leaf_depth = Some(depth),
                Some(leaf_depth) => self.even &= leaf_depth == depth,
            }
        } else if arrays != items {
            self.even = false;
        }
        let Some(slot) = depth.checked_sub(1) else {
            self.outer_length = items;
            return;
        };
        if self.inner_lengths.len() <= slot {
            self.inner_lengths.resize(slot + 1, None);
        }
        match self.inner_lengths[slot] {
            None => self.inner_lengths[slot] = Some(items),
            Some(length) => self.even &= length == items,
        }
    }

    /// Whether data nested so may fill a tensor of `shape`: flat, or nested as the shape.
    pub fn fits(&self, shape: &[usize]) -> bool {
        if self.inner_lengths.is_empty() {
            // Flat (or a lone number): the element count is checked against the shape later.
            return self.even;
        }
        self.even
            && self.leaf_depth == Some(self.inner_lengths.len())
            && shape.len() == self.inner_lengths.len() + 1
            && shape[0] == self.outer_length
            && shape[1..]
                .iter()
                .zip(&self.inner_lengths)
                .all(|(&dimension, &length)| length == Some(dimension))
    }

    /// Why data nested so does not fit `shape`, for an error message.
    pub fn mismatch(&self, shape: &[usize]) -> String {
        if !self.even || self.leaf_depth != Some(self.inner_lengths.len()) {
            return "is nested unevenly (rows of different lengths, or numbers beside \
                    arrays)"
                .to_string();
        }
        let nested: Vec<usize> = std::iter::once(self.outer_length)
            .chain(self.inner_lengths.iter().flatten().copied())
            .collect();
        format!(
            "is nested as {nested:?}, which is not its shape {shape:?}; give the data flat, or \
             nested exactly as the shape"
        )
    }
}

/// A tensor's data as read: typed, or read as FP32 before its `datatype` key came.
enum Data {
    Typed(TensorData),
    /// Read as FP32, the type nearly every such tensor turns out to have; `at` is where
    /// its array starts, to read it again should the type be INT64.
    AsFp32 {
        values: Vec<f32>,
        at: usize,
    },
}

/// The element type the fast path reads a tensor's numbers into.
#[derive(Clone, Copy, PartialEq)]
enum Numeric {
    Fp32,
    Int64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte that is not white space, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// After an element of an array or object: `true` when another follows, `false` at
    /// the closing byte.
    fn more(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                Some(true)
            }
            byte if byte == close => {
                self.at += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// Whether the container just opened closes at once (`[]`, `{}`).
    fn empty(&mut self, close: u8) -> Option<bool> {
        if self.peek()? == close {
            self.at += 1;
            return Some(true);
        }
        Some(false)
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).ok()?;
        self.at += 1;
        Some(text)
    }

    /// An object key and its colon.
    fn key(&mut self) -> Option<&'a str> {
        let key = self.string()?;
        self.eat(b':')?;
        Some(key)
    }

    /// `{"id"?, "inputs", "outputs"?}` in any order.
    fn request(&mut self) -> Option<Request> {
        self.eat(b'{')?;
        let (mut id, mut inputs, mut outputs) = (None, None, None);
        if !self.empty(b'}')? {
            loop {
                match self.key()? {
                    "id" if id.is_none() => id = Some(self.string()?.to_string()),
                    "inputs" if inputs.is_none() => inputs = Some(self.inputs()?),
                    "outputs" if outputs.is_none() => outputs = Some(self.outputs()?),
                    _ => return None,
                }
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        Some(Request {
            id,
            inputs: inputs?,
            outputs: outputs.unwrap_or_default(),
            binary_output: false,
        })
    }

    /// `[item, …]`, each element read by `item`.
    fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.eat(b'[')?;
        let mut items = Vec::new();
        if self.empty(b']')? {
            return Some(items);
        }
        loop {
            items.push(item(self)?);
            if !self.more(b']')? {
                return Some(items);
            }
        }
    }

    fn inputs(&mut self) -> Option<Vec<NamedTensor>> {
        self.array(Self::input)
    }

    /// `[{"name": …}, …]`
    fn outputs(&mut self) -> Option<Vec<Wanted>> {
        self.array(|cursor| {
            cursor.eat(b'{')?;
            if cursor.key()? != "name" {
                return None;
            }
            let name = cursor.string()?.to_string();
            cursor.eat(b'}')?;
            Some(Wanted {
                name,
                binary: false,
            })
        })
    }

    /// One input: `name`, `shape`, `datatype` and `data` in any order.
    fn input(&mut self) -> Option<NamedTensor> {
        self.eat(b'{')?;
        let (mut name, mut shape, mut numeric, mut data) = (None, None, None, None);
        let mut nesting = Nesting::default();
        loop {
            match self.key()? {
                "name" if name.is_none() => name = Some(self.string()?.to_string()),
                "shape" if shape.is_none() => shape = Some(self.shape()?),
                "datatype" if numeric.is_none() => {
                    numeric = Some(match self.string()? {
                        "FP32" => Numeric::Fp32,
                        "INT64" => Numeric::Int64,
                        _ => return None,
                    });
                }
                "data" if data.is_none() => {
                    let expected = shape.as_deref().and_then(element_count);
                    data = Some(match numeric {
                        Some(numeric) => Data::Typed(self.data(numeric, expected, &mut nesting)?),
                        // Keys in alphabetical order (as serde_json's maps write them) put
                        // `data` before `datatype`. Reading the numbers as FP32 at once
                        // costs one pass; keeping them untyped until the type came cost
                        // a second pass and a vector four times the size.
                        None => {
                            let at = self.at;
                            Data::AsFp32 {
                                values: self.fp32(expected, &mut nesting)?,
                                at,
                            }
                        }
                    });
                }
                _ => return None,
            }
            if !self.more(b'}')? {
                break;
            }
        }
        let shape = shape?;
        // Data nested otherwise than the shape is refused on serde's path, which says how.
        if !nesting.fits(&shape) {
            return None;
        }
        let data = match (data?, numeric?) {
            (Data::Typed(data), _) => data,
            (Data::AsFp32 { values, .. }, Numeric::Fp32) => TensorData::Fp32(values),
            (Data::AsFp32 { at, .. }, Numeric::Int64) => {
                let mut again = Cursor {
                    bytes: self.bytes,
                    at,
                };
                // The same array again: its nesting was checked above.
                let mut nesting = Nesting::default();
                again.data(Numeric::Int64, element_count(&shape), &mut nesting)?
            }
        };
        Some(NamedTensor {
            name: name?,
            shape,
            data,
        })
    }

    /// `[d0, d1, …]` with no negative dimension (serde's path words that error).
    fn shape(&mut self) -> Option<Vec<usize>> {
        self.array(|cursor| {
            cursor.skip_space();
            match cursor.number()? {
                Number::Unsigned(dimension) => usize::try_from(dimension).ok(),
                _ => None,
            }
        })
    }

    /// A tensor's elements, flat or nested, into a typed vector. `expected` (the shape's
    /// element count, when the shape came first) only sizes the vector; the count is
    /// checked against the model's signature later, as on serde's path; the arrays'
    /// nesting goes into `nesting`.
    fn data(
        &mut self,
        numeric: Numeric,
        expected: Option<usize>,
        nesting: &mut Nesting,
    ) -> Option<TensorData> {
        Some(match numeric {
            Numeric::Fp32 => TensorData::Fp32(self.fp32(expected, nesting)?),
            Numeric::Int64 => {
                let mut values = Vec::with_capacity(self.capacity(expected));
                self.elements(0, nesting, &mut |number| {
                    values.push(number.to_i64()?);
                    Some(())
                })?;
                fit(&mut values);
                TensorData::Int64(values)
            }
        })
    }

    /// A tensor's elements as FP32 (see [`Cursor::data`]).
    fn fp32(&mut self, expected: Option<usize>, nesting: &mut Nesting) -> Option<Vec<f32>> {
        let mut values = Vec::with_capacity(self.capacity(expected));
        self.elements(0, nesting, &mut |number| {
            // A finite number past FP32's range would read as an infinity: serde's path
            // refuses it and names the element.
            let value = number.to_f32();
            value.is_finite().then(|| values.push(value))
        })?;
        fit(&mut values);
        Some(values)
    }

    /// Room for a tensor's elements: the shape's count when the shape came first, else a
    /// guess from the bytes left, as if every number took [`GUESSED_NUMBER_BYTES`]
    /// (counting ahead to the `]` took longer than growing the vector, and growing it from
    /// nothing took an allocation and eight reallocations for the bench's 784 numbers,
    /// each a trip to the allocator's lock that the compute threads, freeing tensors,
    /// contend for). Bounded by what the body could hold: a shape never sizes memory on its
    /// own.
    fn capacity(&self, expected: Option<usize>) -> usize {
        let left = self.bytes.len().saturating_sub(self.at);
        expected
            .unwrap_or(left / GUESSED_NUMBER_BYTES)
            .min(self.bytes.len() / 2)
    }

    /// Walks a (possibly nested) array of numbers, handing each to `push` in order, and
    /// each array's length to `nesting` as it closes: per element, only a count.
    fn elements(
        &mut self,
        depth: usize,
        nesting: &mut Nesting,
        push: &mut impl FnMut(Number) -> Option<()>,
    ) -> Option<()> {
        if depth > DATA_DEPTH_MAX {
            return None;
        }
        self.eat(b'[')?;
        if self.empty(b']')? {
            nesting.close(depth, 0, 0);
            return Some(());
        }
        let (mut items, mut arrays) = (0, 0);
        loop {
            items += 1;
            if self.peek()? == b'[' {
                arrays += 1;
                self.elements(depth + 1, nesting, push)?;
            } else {
                push(self.number()?)?;
            }
            if !self.more(b']')? {
                nesting.close(depth, items, arrays);
                return Some(());
            }
        }
    }

    /// One JSON number, classified as serde_json classifies it: an integer token is
    /// unsigned (`u64`) or negative (`i64`); a fraction or an exponent makes a float, which
    /// the fast path only ever needs as an `f32`.
    fn number(&mut self) -> Option<Number> {
        let start = self.at;
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let mut mantissa = Mantissa::default();
        let integer_start = self.at;
        match self.bytes.get(self.at)? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(&mut mantissa),
            _ => return None,
        }
        let integer_end = self.at;
        let mut exponent: i64 = 0;
        let mut is_float = false;
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            let fraction_start = self.at;
            self.digits(&mut mantissa);
            let fraction_digits = self.at - fraction_start;
            if fraction_digits == 0 {
                return None;
            }
            exponent -= fraction_digits as i64;
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            let exponent_negative = match self.bytes.get(self.at) {
                Some(b'-') => {
                    self.at += 1;
                    true
                }
                Some(b'+') => {
                    self.at += 1;
                    false
                }
                _ => false,
            };
            let exponent_start = self.at;
            let mut written: i64 = 0;
            while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
                written = written
                    .saturating_mul(10)
                    .saturating_add(i64::from(digit - b'0'));
                self.at += 1;
            }
            if self.at == exponent_start {
                return None;
            }
            exponent = exponent.saturating_add(if exponent_negative { -written } else { written });
            is_float = true;
        }
        if !is_float {
            // serde_json keeps an integer of up to 20 digits as a u64; past 19 digits this
            // reader lets serde decide rather than repeat its overflow rule.
            if integer_end - integer_start > 19 {
                return None;
            }
            let value = mantissa.value;
            if !negative {
                return Some(Number::Unsigned(value));
            }
            // serde_json's rule, `-0` included: a negation that does not come out negative
            // is a float.
            let negated = (value as i64).wrapping_neg();
            return Some(if negated >= 0 {
                Number::Float(-(value as f64) as f32)
            } else {
                Number::Negative(negated)
            });
        }
        let magnitude = mantissa
            .to_f32(exponent)
            .or_else(|| Some(parse_token(&self.bytes[start..self.at])?.abs() as f32))?;
        Some(Number::Float(if negative { -magnitude } else { magnitude }))
    }

    /// Consumes decimal digits into `mantissa`: eight at a time while they last, then one
    /// by one.
    fn digits(&mut self, mantissa: &mut Mantissa) {
        while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
            let Some(eight) = eight_digits(chunk) else {
                break;
            };
            mantissa.push_eight(eight);
            self.at += 8;
        }
        while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
            mantissa.push(digit - b'0');
            self.at += 1;
        }
    }
}

/// The value of eight ASCII digits, or `None` if any byte is not one.
///
/// All eight are checked and combined at once in a `u64` (pairs, then fours, then the
/// eight): the digits of the numbers clients send are most of a request's bytes.
fn eight_digits(chunk: &[u8]) -> Option<u32> {
    let bytes: [u8; 8] = chunk.try_into().ok()?;
    let word = u64::from_le_bytes(bytes);
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    // Every byte is 0x30..=0x39: its high nibble is 3, and adding 6 keeps it 3.
    let high_nibbles = 0xF0F0_F0F0_F0F0_F0F0;
    if word & high_nibbles != ZEROS
        || word.wrapping_add(0x0606_0606_0606_0606) & high_nibbles != ZEROS
    {
        return None;
    }
    // The first digit is the lowest byte. Combine neighbours into two-digit values, then
    // four-digit, then the eight-digit whole.
    let digits = word - ZEROS;
    let pairs = (digits * 10 + (digits >> 8)) & 0x00FF_00FF_00FF_00FF;
    let fours = (pairs * 100 + (pairs >> 16)) & 0x0000_FFFF_0000_FFFF;
    let eight = (fours * 10_000 + (fours >> 32)) & 0xFFFF_FFFF;
    Some(eight as u32)
}

/// A number's significant digits as an integer, while they fit.
#[derive(Default)]
struct Mantissa {
    value: u64,
    /// Set once a digit did not fit; `value` then holds only the leading digits.
    overflowed: bool,
}

impl Mantissa {
    /// Below this, one more digit always fits a u64 (19 digits in all).
    const ONE_MORE_MAX: u64 = 1_000_000_000_000_000_000;
    /// Below this, eight more digits always fit.
    const EIGHT_MORE_MAX: u64 = 100_000_000_000;

    fn push(&mut self, digit: u8) {
        if self.value < Self::ONE_MORE_MAX {
            self.value = self.value * 10 + u64::from(digit);
        } else {
            self.overflowed = true;
        }
    }

    fn push_eight(&mut self, eight: u32) {
        if self.value < Self::EIGHT_MORE_MAX {
            self.value = self.value * 100_000_000 + u64::from(eight);
        } else {
            self.overflowed = true;
        }
    }

    /// `value × 10^exponent` as the `f32` serde's path gives (its correctly rounded `f64`,
    /// then rounded to `f32`), when that can be had without the slow path.
    ///
    /// A mantissa within 2^53 and a power of ten up to 10^22 are both exact in an `f64`, so
    /// one operation gives the correctly rounded `f64` (Clinger's fast path). A longer
    /// mantissa (17-digit decimals, as `repr` writes a float) costs one more rounding: the
    /// `f64` may be off by an ulp or so, which changes the `f32` only if it lies next to a
    /// point halfway between two `f32`s. Those few go to the slow path.
    fn to_f32(&self, exponent: i64) -> Option<f32> {
        const EXACT_MANTISSA_MAX: u64 = 1 << 53;
        if self.overflowed {
            return None;
        }
        let power = *POWERS_OF_TEN.get(usize::try_from(exponent.unsigned_abs()).ok()?)?;
        let value = if exponent < 0 {
            self.value as f64 / power
        } else {
            self.value as f64 * power
        };
        if self.value <= EXACT_MANTISSA_MAX {
            return Some(value as f32);
        }
        clear_of_halfway(value)
    }
}

/// `value` (positive, within a few ulps of the exact number) as an `f32`, unless it lies
/// so near a halfway point between two `f32`s that the exact number might round the other
/// way, or outside the range of normal `f32`s.
fn clear_of_halfway(value: f64) -> Option<f32> {
    /// How far, in `f64` ulps, a value must stay from a halfway point: its error is at most
    /// about two ulps, one more across a power of two; eight leaves room.
    const MARGIN_ULPS: u64 = 8;
    /// An `f64` has 29 more mantissa bits than an `f32`: the halfway point between two
    /// neighbouring `f32`s has exactly the top one of those set.
    const EXTRA_BITS: u32 = 52 - 23;
    if !(f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&value) {
        return None;
    }
    let extra = value.to_bits() & ((1 << EXTRA_BITS) - 1);
    if extra.abs_diff(1 << (EXTRA_BITS - 1)) <= MARGIN_ULPS {
        return None;
    }
    Some(value as f32)
}

/// A number as JSON wrote it.
#[derive(Clone, Copy, Debug)]
enum Number {
    Unsigned(u64),
    Negative(i64),
    /// A fraction or an exponent: only ever an FP32 element.
    Float(f32),
}

impl Number {
    /// As serde's path converts an element of an FP32 tensor.
    fn to_f32(self) -> f32 {
        match self {
            Number::Unsigned(value) => value as f32,
            Number::Negative(value) => value as f32,
            Number::Float(value) => value,
        }
    }

    /// As serde's path converts an element of an INT64 tensor; `None` where it refuses.
    fn to_i64(self) -> Option<i64> {
        match self {
            Number::Unsigned(value) => i64::try_from(value).ok(),
            Number::Negative(value) => Some(value),
            Number::Float(_) => None,
        }
    }
}

/// Powers of ten that an `f64` holds exactly.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The correctly rounded `f64` of a number token, by the standard library; `None` out of
/// an `f64`'s range, which serde_json refuses.
fn parse_token(token: &[u8]) -> Option<f64> {
    let value: f64 = std::str::from_utf8(token).ok()?.parse().ok()?;
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests;
