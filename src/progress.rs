//! The restore progress bar of `miroir run` on a terminal: while partitions restore their state
//! from their changelogs, a bar counts the changelog records read; log lines print above it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar on the terminal, while there is one.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How often the bar follows the restore.
const TICK: Duration = Duration::from_millis(200);

/// Where log lines go: standard error, above the bar while there is one.
#[derive(Clone, Copy)]
pub struct LogOutput;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogOutput {
    type Writer = LogOutput;

    fn make_writer(&'a self) -> LogOutput {
        LogOutput
    }
}

impl Write for LogOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The bar's length and position after hearing that `remaining` records are still to read,
/// from a bar at (`length`, `position`): records still to read beyond the bar's end (another
/// partition started restoring) lengthen it.
fn advance((length, position): (u64, u64), remaining: u64) -> (u64, u64) {
    let length = length.max(position + remaining);
    (length, length - remaining)
}

/// Draws the bar on standard error while `remaining` (the records the instance's restores
/// still read, `None` while none runs) says a restore runs, until `stop`.
pub fn follow(remaining: impl Fn() -> Option<i64>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let left = remaining().map(|r| r.max(0) as u64);
        let mut slot = BAR.lock().unwrap_or_else(|e| e.into_inner());
        match (left, slot.as_ref()) {
            (Some(left), None) => {
                let bar = ProgressBar::with_draw_target(Some(left), ProgressDrawTarget::stderr())
                    .with_style(
                        ProgressStyle::with_template(
                            "restoring state from changelogs {bar:40} {pos}/{len} records ({per_sec}, {eta} left)",
                        )
                        .expect("a valid template"),
                    );
                *slot = Some(bar);
            }
            (Some(left), Some(bar)) => {
                let (length, position) = advance((bar.length().unwrap_or(0), bar.position()), left);
                bar.set_length(length);
                bar.set_position(position);
            }
            (None, Some(bar)) => {
                bar.finish_and_clear();
                *slot = None;
            }
            (None, None) => {}
        }
        drop(slot);
        std::thread::sleep(TICK);
    }
    if let Some(bar) = BAR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn the_bar_moves_as_records_are_read_and_grows_with_new_restores() {
        assert_eq!(advance((100, 0), 100), (100, 0));
        assert_eq!(advance((100, 0), 40), (100, 60));
        // Another partition adds 50 records to read.
        assert_eq!(advance((100, 60), 90), (150, 60));
        assert_eq!(advance((150, 60), 0), (150, 150));
    }
}
