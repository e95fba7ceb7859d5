//! Pauses at named points for the end-to-end tests that kill a process there (a prune
//! between its manifests and its data, a standby half-way through an apply). Compiled in
//! only with the `test-hooks` feature: release binaries carry none of it.
//!
//! With the feature, `BKIMG_TEST_PAUSE=NAME:FILE` makes the process create FILE (holding
//! its pid) when it reaches the point NAME, then wait there until FILE is removed or the
//! process is killed: a test waits for the file, not for a time.

/// Waits at the point `name` when the test environment asks for it.
#[cfg(feature = "test-hooks")]
pub fn pause(name: &str) {
    let Some(spec) = std::env::var_os("BKIMG_TEST_PAUSE") else {
        return;
    };
    let spec = spec.to_string_lossy();
    let Some((point, file)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    if std::fs::write(file, std::process::id().to_string()).is_err() {
        return;
    }
    while std::path::Path::new(file).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause(_name: &str) {}

/// Where the machine's UEFI variables are read from: efivarfs, or with the `test-hooks`
/// feature the directory `BKIMG_TEST_EFIVARS` names (files laid out as efivarfs shows
/// them), so that a test can give a capture the boot entries of a machine it is not.
pub fn efivars_dir() -> std::path::PathBuf {
    #[cfg(feature = "test-hooks")]
    if let Some(dir) = std::env::var_os("BKIMG_TEST_EFIVARS") {
        return dir.into();
    }
    std::path::PathBuf::from("/sys/firmware/efi/efivars")
}

/// The wall clock as bkimg reads it for lock ages: with the `test-hooks` feature shifted
/// by `BKIMG_TEST_CLOCK_SKEW` seconds (negative: behind), so a test can run a process whose
/// clock is wrong.
pub fn wall_clock() -> std::time::SystemTime {
    let now = std::time::SystemTime::now();
    #[cfg(feature = "test-hooks")]
    if let Some(skew) = std::env::var("BKIMG_TEST_CLOCK_SKEW")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        let by = std::time::Duration::from_secs(skew.unsigned_abs());
        return if skew >= 0 { now + by } else { now - by };
    }
    now
}
