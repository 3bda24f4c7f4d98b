//! The binary key under which an internal table's row is stored.
//!
//! A table's primary key (one or more typed [`Value`]s) is encoded so that
//!
//! - two keys are equal exactly when their encodings are equal: types are tagged, NULL is not
//!   the empty text, and a text part cannot swallow the next part (no separator ambiguity:
//!   `('a|b', 'c')` and `('a', 'b|c')` are two keys);
//! - byte order is key order: encodings compare as [`Value`]s do (NULL first, then by type,
//!   then by value; floats in IEEE total order), so a RocksDB scan returns rows in key order
//!   and a prefix of the key is a prefix of the bytes.
//!
//! Each part is a tag byte followed by the value:
//!
//! | value | tag | bytes |
//! | --- | --- | --- |
//! | NULL | `0x00` | none |
//! | boolean | `0x01` | `0x00` or `0x01` |
//! | bigint | `0x02` | 8 bytes big-endian, sign bit flipped |
//! | double | `0x03` | 8 bytes big-endian of the total-order bits |
//! | text | `0x04` | UTF-8 with `0x00` written `0x00 0xFF`, then the terminator `0x00 0x01` |
//! | timestamp | `0x05` | like bigint (microseconds) |
//!
//! The URL form of a key ([`crate::value::key_text`]) is for people and URLs only.

use crate::value::Value;

const NULL: u8 = 0x00;
const BOOL: u8 = 0x01;
const INT: u8 = 0x02;
const FLOAT: u8 = 0x03;
const TEXT: u8 = 0x04;
const TIMESTAMP: u8 = 0x05;

/// Ends a text part; sorts before any escaped or plain byte that could follow in a longer text.
const TEXT_END: [u8; 2] = [0x00, 0x01];
/// A `0x00` byte inside a text part.
const TEXT_ZERO: [u8; 2] = [0x00, 0xFF];

/// Encodes the key columns `key` of `row`.
pub fn encode_row_key(row: &[Value], key: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * key.len());
    for i in key {
        encode_value(&row[*i], &mut out);
    }
    out
}

/// An encoded key in lower-case hexadecimal, which keeps the keys' byte order (scan cursors,
/// the keys of repartition records).
pub fn key_hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes a key given as its values, in key order.
pub fn encode_key(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * values.len());
    for v in values {
        encode_value(v, &mut out);
    }
    out
}

/// Encodes the start of a key: whole `values`, then the beginning `text_prefix` of the next
/// part, a text. Every key whose first parts are `values` and whose next part is a text
/// starting with `text_prefix` has an encoding that starts with the result.
pub fn encode_key_prefix(values: &[Value], text_prefix: Option<&str>) -> Vec<u8> {
    let mut out = encode_key(values);
    if let Some(text) = text_prefix {
        out.push(TEXT);
        escape_text(text, &mut out);
    }
    out
}

/// Appends the encoding of one key part.
fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(b) => out.extend([BOOL, u8::from(*b)]),
        Value::Int(i) => {
            out.push(INT);
            out.extend(ordered_i64(*i));
        }
        Value::Float(f) => {
            out.push(FLOAT);
            let bits = f.0.to_bits();
            // IEEE total order: negative numbers reversed, positive ones above them.
            let ordered = if bits >> 63 == 1 {
                !bits
            } else {
                bits | 1 << 63
            };
            out.extend(ordered.to_be_bytes());
        }
        Value::Text(s) => {
            out.push(TEXT);
            escape_text(s, out);
            out.extend(TEXT_END);
        }
        Value::Timestamp(t) => {
            out.push(TIMESTAMP);
            out.extend(ordered_i64(*t));
        }
    }
}

/// Big-endian with the sign bit flipped: unsigned byte order is signed order.
fn ordered_i64(i: i64) -> [u8; 8] {
    ((i as u64) ^ (1 << 63)).to_be_bytes()
}

fn escape_text(text: &str, out: &mut Vec<u8>) {
    for &b in text.as_bytes() {
        if b == 0 {
            out.extend(TEXT_ZERO);
        } else {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::value::F64;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(|f| Value::Float(F64(f))),
            // Short texts over a small alphabet (with NUL and the URL separator) collide and
            // share prefixes often.
            "[a|\\\\\u{0}\u{1}\u{ff}]{0,4}".prop_map(|s| Value::Text(s.as_str().into())),
            any::<i64>().prop_map(Value::Timestamp),
        ]
    }

    fn key() -> impl Strategy<Value = Vec<Value>> {
        prop::collection::vec(value(), 1..4)
    }

    proptest! {
        #[test]
        fn equal_encodings_are_equal_keys_and_order_is_key_order(a in key(), b in key()) {
            let (ea, eb) = (encode_key(&a), encode_key(&b));
            prop_assert_eq!(ea == eb, a == b);
            prop_assert_eq!(ea.cmp(&eb), a.cmp(&b));
        }

        #[test]
        fn a_text_prefix_is_a_byte_prefix(first in value(), text in "[a|\u{0}]{0,5}", cut in 0usize..6) {
            let cut = cut.min(text.len());
            let key = vec![first.clone(), Value::Text(text.as_str().into())];
            let prefix = encode_key_prefix(&[first], Some(&text[..cut]));
            prop_assert!(encode_key(&key).starts_with(&prefix));
        }
    }

    #[test]
    fn keys_that_read_alike_in_their_url_form_are_apart() {
        let t = |s: &str| Value::Text(s.into());
        assert_ne!(
            encode_key(&[t("a|b"), t("c")]),
            encode_key(&[t("a"), t("b|c")])
        );
        assert_ne!(encode_key(&[Value::Null]), encode_key(&[t("")]));
        assert_ne!(encode_key(&[Value::Int(1)]), encode_key(&[t("1")]));
    }

    #[test]
    fn row_keys_take_the_key_columns_in_key_order() {
        let row = vec![Value::Int(1), Value::Text("x".into()), Value::Null];
        assert_eq!(
            encode_row_key(&row, &[2, 0]),
            encode_key(&[Value::Null, Value::Int(1)])
        );
    }
}
