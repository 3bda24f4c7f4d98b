//! Partition math: which partition a key belongs to, as Kafka's Java client computes it.
//!
//! Kafka's default partitioner hashes the key bytes with murmur2 (seed `0x9747b28c`), clears the
//! sign bit and takes the result modulo the partition count. miroir uses the same function to
//! route a query for a key to the instance that owns its partition; producers must use the same
//! partitioner (librdkafka: `partitioner=murmur2_random`).

use crate::value::Value;

/// Kafka's murmur2 hash of `data` (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions`, as Kafka's default partitioner chooses it.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

/// The partition among `partitions` of a row whose key (or the part of it that places the
/// row) is `value`: that of a Kafka message keyed by the value's key text.
pub fn partition_of_value(value: &Value, partitions: u32) -> u32 {
    partition_for_key(value.to_key_text().as_bytes(), partitions)
}

/// The worker (of `workers`) that runs the task of `partition`.
pub fn worker_for_partition(partition: u32, workers: usize) -> usize {
    partition as usize % workers.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafka_java_client() {
        // Reference values from org.apache.kafka.common.utils.Utils.murmur2 (Kafka's UtilsTest).
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for i in 0..1000 {
            let key = format!("user-{i}");
            let p = partition_for_key(key.as_bytes(), 7);
            assert!(p < 7);
            assert_eq!(p, partition_for_key(key.as_bytes(), 7));
        }
    }
}
