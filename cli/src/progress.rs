//! Progress bars on a terminal; silence otherwise (notes still go to stderr).

use std::io::IsTerminal;
use std::sync::Mutex;

use bkimg_format::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
}

/// The bar on screen, if any: for notes from code that has no [`Bar`] to hand (a remote
/// store retrying).
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A note on stderr, above the bar on screen if there is one.
pub fn note(text: &str) {
    let shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match shown {
        Some(b) => b.suspend(|| eprintln!("bkimg: {text}")),
        None => eprintln!("bkimg: {text}"),
    }
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        let show = !quiet && std::io::stderr().is_terminal();
        Bar {
            bar: show.then(|| {
                let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                *SHOWN.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
                bar
            }),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            *SHOWN.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

impl Progress for Bar {
    fn begin(&self, what: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_prefix(what.to_string());
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn note(&self, text: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("bkimg: {text}")),
            None => eprintln!("bkimg: {text}"),
        }
    }
}
