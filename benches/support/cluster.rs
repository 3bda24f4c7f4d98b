//! Helpers of the benchmarks that run several instances.

/// The partitions of `topic` the instance at `base` (`http://host:port`) says it owns.
pub fn owned(client: &reqwest::blocking::Client, base: &str, topic: &str) -> Vec<u32> {
    let view: serde_json::Value = client
        .get(format!("{base}/v1/cluster"))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default();
    let me = view["instance"].clone();
    view["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["instance"] == me)
        .and_then(|m| m["partitions"][topic].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.as_u64().map(|p| p as u32))
        .collect()
}
