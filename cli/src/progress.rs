//! Progress bars on a terminal; silence otherwise (notes still go to stderr).

use std::io::IsTerminal;

use bkimg_format::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
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
                bar
            }),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
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
