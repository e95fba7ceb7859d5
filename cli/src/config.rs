//! The optional config file (TOML; default /etc/bkimg/bkimg.toml, else `--config FILE` or
//! BKIMG_CONFIG) and where each setting comes from: a command-line flag first, then its
//! environment variable, then the file, then the built-in default.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Deserialize;

use crate::exit::Usage;

/// Read when neither `--config` nor BKIMG_CONFIG names a file; may be absent.
pub const DEFAULT_PATH: &str = "/etc/bkimg/bkimg.toml";

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The repository of every command that takes `--repo`.
    pub repository: Option<PathBuf>,
    /// Worker count of every command that takes `--threads`.
    pub threads: Option<NonZeroUsize>,
    /// `--verify-cbt-every` of `capture` and `replicate --continuous`: every Nth capture
    /// of a disk that could use its change map reads it whole instead (0: never).
    pub verify_cbt_every: Option<u32>,
    #[serde(default)]
    pub s3: S3Config,
    #[serde(default)]
    pub standby: StandbyConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Recovery media settings (bkimg rescue build carries the file; docs/rescue.md).
    #[serde(default)]
    pub rescue: Option<bkimg_rescue::config::RescueConfig>,
    /// The file this came from (None: no file).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct S3Config {
    /// Used when neither `--endpoint` nor the AWS chain (AWS_ENDPOINT_URL_S3,
    /// AWS_ENDPOINT_URL, profiles) names one.
    pub endpoint: Option<String>,
    /// Used when the AWS chain (AWS_REGION, profiles) names none.
    pub region: Option<String>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StandbyConfig {
    /// This host's key directory: `replicate --key`, `standby serve --key`, `standby
    /// keygen --dir`, `standby fingerprint --dir`.
    pub key: Option<PathBuf>,
    /// `--server-fingerprint` of `replicate` and of the commands that read a bkimg://
    /// repository.
    pub server_fingerprint: Option<String>,
    /// `standby serve --allow-reader`: keys that may only read (fingerprints or files of
    /// them).
    pub allow_reader: Option<Vec<String>>,
}

/// The `--keep-*` rules of `prune` and `replicate --continuous`, under the flags' names.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionConfig {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    #[serde(default, deserialize_with = "age")]
    pub keep_within: Option<Duration>,
}

/// `keep-within = "7d"`, checked while parsing so that a bad value is reported at its line.
fn age<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::units::duration_or_zero(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl Config {
    /// The file `explicit` names (it must exist), else DEFAULT_PATH if it exists.
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        match explicit {
            Some(path) => Config::read(path, true),
            None => Config::read(Path::new(DEFAULT_PATH), false),
        }
    }

    fn read(path: &Path, must_exist: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config::default())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Usage(format!(
                    "config file {} (named by --config or BKIMG_CONFIG) does not exist: \
                     create it or name another",
                    path.display()
                ))
                .into())
            }
            Err(e) => {
                return Err(
                    Usage(format!("cannot read config file {}: {e}", path.display())).into(),
                )
            }
        };
        let mut config = Config::parse(&text).map_err(|why| {
            Usage(format!(
                "config file {}{why}: fix it (the keys are in docs/cli.md)",
                path.display()
            ))
        })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses a config file's text; the error says where (" line L, column C: what").
    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" line {line}, column {column}")
            });
            format!("{at}: {}", e.message().trim_end())
        })
    }

    /// `--verify-cbt-every`: the flag, else the file's `verify-cbt-every`, else 0 (never).
    pub fn verify_cbt_every(&self, flag: Option<u32>) -> u32 {
        flag.or(self.verify_cbt_every).unwrap_or(0)
    }

    pub fn threads(&self, flag: Option<usize>) -> Option<usize> {
        flag.or(self.threads.map(NonZeroUsize::get))
    }
}

/// `--repo`, shared by every command that opens a repository.
#[derive(Args, Clone, Debug, Default)]
pub struct RepoArgs {
    /// Repository: a directory; for the commands that only read one also an export file,
    /// s3://BUCKET[/PREFIX] or a standby host bkimg://HOST:PORT [default: `repository` in
    /// the config file]
    #[arg(long = "repo", env = "BKIMG_REPOSITORY", value_name = "REPO")]
    repo: Option<PathBuf>,
}

impl RepoArgs {
    #[cfg(test)]
    pub fn new(path: PathBuf) -> RepoArgs {
        RepoArgs { repo: Some(path) }
    }

    /// Takes the config file's repository when neither `--repo` nor BKIMG_REPOSITORY
    /// (which clap has read already) gave one.
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        if self.repo.is_none() {
            self.repo = config.repository.clone();
        }
        if self.repo.is_none() {
            return Err(Usage(format!(
                "no repository given: pass --repo REPO, set BKIMG_REPOSITORY, or put \
                 `repository = \"...\"` in the config file ({})",
                config
                    .path
                    .as_ref()
                    .map_or(DEFAULT_PATH.into(), |p| p.display().to_string())
            ))
            .into());
        }
        Ok(())
    }

    /// The repository; only after `settle`.
    pub fn path(&self) -> &Path {
        self.repo
            .as_deref()
            .expect("settle() gives every command its repository before it runs")
    }

    /// Refuses a standby host (bkimg://) where the command writes to the repository or
    /// needs it on this host; `instead` says what to do. Only after `settle`.
    pub fn require_local(&self, command: &str, instead: &str) -> Result<()> {
        match self.path().to_str() {
            Some(url) if url.starts_with("bkimg://") => Err(Usage(format!(
                "bkimg {command} cannot use --repo {url}: a standby host's repository is read \
                 over the network (list, info, verify, restore, export) and written only by \
                 `bkimg replicate --to {url}`; {instead}"
            ))
            .into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
# every key
repository = "/var/lib/bkimg/repo"
threads = 8
verify-cbt-every = 7

[s3]
endpoint = "http://127.0.0.1:9000"
region = "eu-west-1"

[standby]
key = "/etc/bkimg/key"
server-fingerprint = "ab12"
allow-reader = ["cd34", "/etc/bkimg/readers"]

[retention]
keep-last = 3
keep-hourly = 48
keep-daily = 30
keep-weekly = 8
keep-monthly = 12
keep-within = "1d 12h"
"#;

    #[test]
    fn parses_every_key() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(
            c.repository.as_deref(),
            Some(Path::new("/var/lib/bkimg/repo"))
        );
        assert_eq!(c.threads(None), Some(8));
        assert_eq!(c.verify_cbt_every(None), 7);
        assert_eq!(c.verify_cbt_every(Some(0)), 0);
        assert_eq!(Config::default().verify_cbt_every(None), 0);
        assert_eq!(c.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.standby.key.as_deref(), Some(Path::new("/etc/bkimg/key")));
        assert_eq!(c.standby.server_fingerprint.as_deref(), Some("ab12"));
        assert_eq!(
            c.standby.allow_reader.as_deref(),
            Some(&["cd34".to_string(), "/etc/bkimg/readers".to_string()][..])
        );
        let r = &c.retention;
        assert_eq!(
            (
                r.keep_last,
                r.keep_hourly,
                r.keep_daily,
                r.keep_weekly,
                r.keep_monthly
            ),
            (Some(3), Some(48), Some(30), Some(8), Some(12))
        );
        assert_eq!(r.keep_within, Some(Duration::from_secs(36 * 3600)));
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn bad_files_say_where() {
        for (text, line, what) in [
            (
                "repository = \"/r\"\nrepo = \"/x\"\n",
                2,
                "unknown field `repo`",
            ),
            (
                "[s3]\nendpoint = \"e\"\nbucket = \"b\"\n",
                3,
                "unknown field `bucket`",
            ),
            ("threads = 0\n", 1, "nonzero"),
            ("threads = \"four\"\n", 1, "invalid type"),
            ("[retention]\nkeep-within = \"soon\"\n", 2, "not a duration"),
            ("repository = /r\n", 1, ""),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(
                e.starts_with(&format!(" line {line}, column ")),
                "{text:?}: {e}"
            );
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn explicit_file_must_exist_default_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let e = Config::load(Some(&missing)).unwrap_err();
        assert!(format!("{e}").contains("missing.toml"), "{e}");
        assert_eq!(crate::exit::code_for(&e), crate::exit::USAGE);
        assert_eq!(Config::read(&missing, false).unwrap(), Config::default());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[retention]\nkeep-dayly = 3\n").unwrap();
        let e = format!("{}", Config::load(Some(&bad)).unwrap_err());
        assert!(
            e.contains("bad.toml line 2, column 1: unknown field `keep-dayly`"),
            "{e}"
        );
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "repository = \"/r\"\n").unwrap();
        let c = Config::load(Some(&good)).unwrap();
        assert_eq!(c.path.as_deref(), Some(good.as_path()));
    }

    #[test]
    fn repository_from_flag_then_file() {
        let file = Config::parse("repository = \"/from/file\"\n").unwrap();
        let mut given = RepoArgs::new("/from/flag".into());
        given.settle(&file).unwrap();
        assert_eq!(given.path(), Path::new("/from/flag"));
        let mut absent = RepoArgs::default();
        absent.settle(&file).unwrap();
        assert_eq!(absent.path(), Path::new("/from/file"));
        let e = RepoArgs::default().settle(&Config::default()).unwrap_err();
        let msg = format!("{e}");
        for way in ["--repo", "BKIMG_REPOSITORY", "repository =", DEFAULT_PATH] {
            assert!(msg.contains(way), "{msg}");
        }
        assert_eq!(crate::exit::code_for(&e), crate::exit::USAGE);
    }

    #[test]
    fn standby_hosts_are_refused_where_a_command_writes() {
        let standby = RepoArgs::new("bkimg://sb:7070".into());
        let e = standby
            .require_local("capture", "capture into a directory")
            .unwrap_err();
        let msg = format!("{e}");
        assert!(
            msg.contains("bkimg replicate --to bkimg://sb:7070"),
            "{msg}"
        );
        assert!(msg.contains("capture into a directory"), "{msg}");
        assert_eq!(crate::exit::code_for(&e), crate::exit::USAGE);
        RepoArgs::new("/var/lib/bkimg".into())
            .require_local("capture", "")
            .unwrap();
    }

    #[test]
    fn threads_from_flag_then_file() {
        let file = Config::parse("threads = 3\n").unwrap();
        assert_eq!(file.threads(Some(5)), Some(5));
        assert_eq!(file.threads(None), Some(3));
        assert_eq!(Config::default().threads(None), None);
    }
}
