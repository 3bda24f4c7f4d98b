//! Reading a topic up to its end for a view (the command processor's entities and answered
//! ids): a catch-up cut short by its time limit says so, and the next one goes on from where
//! it stopped, so a view is complete once one call returns true, with every record read once.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::tail::Tail;
use miroir_connectors::kafka::KafkaConfig;
use rdkafka::message::Message;
use support::*;

#[test]
fn a_catch_up_cut_short_goes_on_where_it_stopped() {
    let run = Run::new("tail");
    let topic = format!("entities-{run}");
    let config = KafkaConfig::new(brokers());
    create_topic(&config, &topic, 4).unwrap();
    let publisher = Publisher::new(&config).unwrap();
    let n = 20_000;
    for i in 0..n {
        let key = format!("k{i}");
        publisher
            .send(&topic, key.as_bytes(), Some(b"{}".as_slice()))
            .unwrap();
    }
    publisher.flush().unwrap();

    let mut tail = Tail::open(&config, &topic).unwrap();
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(
            calls < 10_000,
            "never caught up: {} records read",
            seen.len()
        );
        let done = tail
            .catch_up(Duration::from_millis(20), |m| {
                *seen.entry((m.partition(), m.offset())).or_default() += 1;
                Ok(())
            })
            .unwrap();
        if done {
            break;
        }
    }
    assert!(calls > 1, "a 20 ms limit cut the first catch-up short");
    assert_eq!(seen.len(), n, "every record read");
    assert!(seen.values().all(|c| *c == 1), "and read once");
}
