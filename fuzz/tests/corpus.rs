//! Replays every checked-in fuzz corpus file (fuzz/corpus/<target>/*) through its target's
//! harness, without libFuzzer: the inputs that once crashed a parser, and the coverage the
//! fuzzer found, stay checked on every `cargo test`.

use std::path::Path;
use std::time::Instant;

#[test]
fn every_corpus_file_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let start = Instant::now();
    let mut total = 0;
    for &(name, harness) in bkimg_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("reading a corpus directory").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for target {name}");
        for path in &files {
            let data = bkimg_fuzz::read_file(path).expect("reading a corpus file");
            // A panic names the file: the harness's own message follows.
            eprintln!("{name}: {}", path.display());
            harness(&data);
        }
        total += files.len();
    }
    eprintln!("{total} corpus files replayed in {:?}", start.elapsed());
}
