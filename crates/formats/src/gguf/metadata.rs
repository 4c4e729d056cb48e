//! GGUF metadata values: every scalar type, strings, and (nested) arrays.
//!
//! Arrays are stored typed (`Vec<u32>`, `Vec<String>`, ...) rather than as a vector of values, so
//! that the memory a parsed array takes stays within a small multiple of the bytes it occupies in
//! the file: the reader checks each count against the bytes left before allocating.

/// The value type id of a metadata entry or of an array's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type with GGUF id `id` (0 to 12).
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The fewest bytes one value of this type occupies in a file (a string's or array's length
    /// prefix): the bound that keeps a declared count honest.
    pub fn min_bytes(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetadataArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, typed by its elements.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum MetadataArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetadataArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetadataArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        use MetadataArray as A;
        match self {
            A::U8(v) => v.len(),
            A::I8(v) => v.len(),
            A::U16(v) => v.len(),
            A::I16(v) => v.len(),
            A::U32(v) => v.len(),
            A::I32(v) => v.len(),
            A::F32(v) => v.len(),
            A::Bool(v) => v.len(),
            A::String(v) => v.len(),
            A::Array(v) => v.len(),
            A::U64(v) => v.len(),
            A::I64(v) => v.len(),
            A::F64(v) => v.len(),
        }
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn element_type(&self) -> ValueType {
        use MetadataArray as A;
        match self {
            A::U8(_) => ValueType::U8,
            A::I8(_) => ValueType::I8,
            A::U16(_) => ValueType::U16,
            A::I16(_) => ValueType::I16,
            A::U32(_) => ValueType::U32,
            A::I32(_) => ValueType::I32,
            A::F32(_) => ValueType::F32,
            A::Bool(_) => ValueType::Bool,
            A::String(_) => ValueType::String,
            A::Array(_) => ValueType::Array,
            A::U64(_) => ValueType::U64,
            A::I64(_) => ValueType::I64,
            A::F64(_) => ValueType::F64,
        }
    }

    /// Integer elements as i64 (`None` for non-integer arrays or a u64 beyond i64).
    pub fn as_integers(&self) -> Option<Vec<i64>> {
        use MetadataArray as A;
        Some(match self {
            A::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            A::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            A::I64(v) => v.clone(),
            A::Bool(v) => v.iter().map(|&x| i64::from(x)).collect(),
            _ => return None,
        })
    }
}

impl MetadataValue {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        use MetadataValue as V;
        match self {
            V::U8(_) => ValueType::U8,
            V::I8(_) => ValueType::I8,
            V::U16(_) => ValueType::U16,
            V::I16(_) => ValueType::I16,
            V::U32(_) => ValueType::U32,
            V::I32(_) => ValueType::I32,
            V::F32(_) => ValueType::F32,
            V::Bool(_) => ValueType::Bool,
            V::String(_) => ValueType::String,
            V::Array(_) => ValueType::Array,
            V::U64(_) => ValueType::U64,
            V::I64(_) => ValueType::I64,
            V::F64(_) => ValueType::F64,
        }
    }

    /// Any integer (or bool) value as u64, if non-negative. Writers disagree on integer widths
    /// (`block_count` is u32 in llama.cpp files, other tools write i32 or u64), so readers take
    /// any.
    pub fn as_u64(&self) -> Option<u64> {
        use MetadataValue as V;
        match *self {
            V::U8(x) => Some(x.into()),
            V::I8(x) => u64::try_from(x).ok(),
            V::U16(x) => Some(x.into()),
            V::I16(x) => u64::try_from(x).ok(),
            V::U32(x) => Some(x.into()),
            V::I32(x) => u64::try_from(x).ok(),
            V::U64(x) => Some(x),
            V::I64(x) => u64::try_from(x).ok(),
            V::Bool(x) => Some(x.into()),
            _ => None,
        }
    }

    /// A number (integer or float) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        use MetadataValue as V;
        match *self {
            V::F32(x) => Some(x.into()),
            V::F64(x) => Some(x),
            V::I8(x) => Some(x.into()),
            V::I16(x) => Some(x.into()),
            V::I32(x) => Some(x.into()),
            V::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// A bool (or an integer 0/1).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => match self.as_u64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array.
    pub fn as_array(&self) -> Option<&MetadataArray> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }
}
