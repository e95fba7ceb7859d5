//! The rescue configuration: the `[rescue]` table of the bkimg config file built into the
//! image (`bkimg --config FILE rescue build`), overridden per boot by `bkimg.*` words on
//! the kernel command line.

use std::path::PathBuf;

use serde::Deserialize;

use crate::disks::DiskRule;

/// What to do once the restore is complete.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum After {
    #[default]
    Reboot,
    Poweroff,
    Shell,
}

impl std::str::FromStr for After {
    type Err = String;
    fn from_str(s: &str) -> Result<After, String> {
        match s {
            "reboot" => Ok(After::Reboot),
            "poweroff" => Ok(After::Poweroff),
            "shell" => Ok(After::Shell),
            _ => Err(format!(
                "after must be reboot, poweroff or shell, not {s:?}"
            )),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RescueConfig {
    /// Restore without asking anything (also `bkimg.auto=1`).
    #[serde(default)]
    pub unattended: bool,
    /// Restore point id, unique prefix, or "latest".
    #[serde(default)]
    pub point: Option<String>,
    /// Where the repository is: a path on the media ("/bkimg/exports/NAME"), a path on
    /// another disk ("LABEL=NAME:/path", "UUID=...:/path"). Default: the one export on
    /// the media, else the config file's top-level `repository`.
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub after: After,
    /// Allow writing over disks that hold data.
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskRule>,
    /// Chunks read at once.
    #[serde(default)]
    pub threads: Option<usize>,
    /// After a restore under UEFI, add a boot entry for the restored system's loader, first
    /// in BootOrder [default: true].
    #[serde(default)]
    pub boot_entry: Option<bool>,
    /// Credentials of an s3:// repository (carried by the image: the build says so; or
    /// give them per boot on the kernel command line).
    #[serde(default)]
    pub aws_access_key_id: Option<String>,
    #[serde(default)]
    pub aws_secret_access_key: Option<String>,
    /// The key file of an encrypted or signed repository: "LABEL=NAME:/path" or
    /// "UUID=...:/path" on another disk (a second stick), or a path on the media (also
    /// `bkimg.key-file=`). A file `bkimg.key` on the BKIMG-CONF partition is used too;
    /// without either, a person at the console is asked for the passphrase.
    #[serde(default)]
    pub key_file: Option<String>,
    /// A standby host as the repository (`repository = "bkimg://HOST:PORT"`): its pinned
    /// fingerprint and this stick's reader key.
    #[serde(default)]
    pub standby: StandbyAccess,
    /// How the rescue system reaches a remote repository [default: DHCP on every
    /// interface with a link].
    #[serde(default)]
    pub network: NetworkConfig,
    /// This machine's name in a repository several machines share: its newest point is
    /// restored (also `bkimg.host=NAME`).
    #[serde(default)]
    pub host: Option<String>,
    /// A fleet's machines by what identifies them: DMI system UUID, DMI serial number or a
    /// MAC address → host name (one stick for a whole site).
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<String, String>,
}

/// How the rescue reads a standby host: the standby's certificate fingerprint (as `bkimg
/// standby keygen` printed it there) and a key pair the standby accepts as a reader
/// (`bkimg standby serve --allow-reader FP`), the PEM texts of its standby.key and
/// standby.crt.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StandbyAccess {
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    #[serde(default)]
    pub key_pem: Option<String>,
    #[serde(default)]
    pub cert_pem: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkConfig {
    /// Only this interface ("eth0") [default: the first with a link that gets an address].
    #[serde(default)]
    pub interface: Option<String>,
    /// A static address with its prefix ("192.0.2.10/24") instead of DHCP.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// The parts of the config file's [s3] table the rescue uses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct S3Section {
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

/// What the rescue reads of a whole bkimg config file (the CLI checks the other tables).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SiteConfig {
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub rescue: RescueConfig,
    #[serde(default)]
    pub s3: S3Section,
}

impl SiteConfig {
    pub fn parse(text: &str) -> Result<SiteConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Config files layered: a later file's settings replace an earlier one's, table by
    /// table (the image's built-in file, then a BKIMG-CONF partition's).
    pub fn parse_layers(texts: &[&str]) -> Result<SiteConfig, String> {
        let mut merged = toml::Table::new();
        for text in texts {
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
            merge(&mut merged, table);
        }
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Every setting a config file makes, as dotted paths ("rescue.after"), for saying what a
/// file changed without printing its values.
pub fn settings_in(text: &str) -> Vec<String> {
    fn walk(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in table {
            match v.as_table() {
                Some(t) => walk(t, &format!("{prefix}{k}."), out),
                None => out.push(format!("{prefix}{k}")),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(t) = text.parse::<toml::Table>() {
        walk(&t, "", &mut out);
    }
    out
}

impl RescueConfig {
    /// Applies `bkimg.NAME=VALUE` words of a kernel command line.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<(), String> {
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("bkimg.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, "1"));
            let flag = |v: &str| matches!(v, "1" | "yes" | "true" | "on");
            match key {
                "auto" => self.unattended = flag(value),
                "point" => self.point = Some(value.to_string()),
                "repo" => self.repository = Some(value.to_string()),
                "after" => self.after = value.parse()?,
                "overwrite" => self.overwrite = flag(value),
                "boot-entry" => self.boot_entry = Some(flag(value)),
                "host" => self.host = Some(value.to_string()),
                "ip" if value == "dhcp" => self.network.address = None,
                "ip" => self.network.address = Some(value.to_string()),
                "gateway" => self.network.gateway = Some(value.to_string()),
                "dns" => self.network.dns.push(value.to_string()),
                "interface" => self.network.interface = Some(value.to_string()),
                "s3-access-key" => self.aws_access_key_id = Some(value.to_string()),
                "s3-secret-key" => self.aws_secret_access_key = Some(value.to_string()),
                "key-file" => self.key_file = Some(value.to_string()),
                "target" => {
                    // bkimg.target=disk0=/dev/nvme0n1
                    let (source, target) = value.split_once('=').ok_or_else(|| {
                        format!("bkimg.target={value}: write bkimg.target=disk0=/dev/NAME")
                    })?;
                    self.disks.retain(|d| d.source != source);
                    self.disks.push(DiskRule {
                        source: source.to_string(),
                        target: Some(PathBuf::from(target)),
                        ..DiskRule::default()
                    });
                }
                "media" | "shell" => {}
                _ => return Err(format!("unknown kernel command line option bkimg.{key}")),
            }
        }
        Ok(())
    }
}

/// Settings that give access to a repository: building them into an image is said aloud.
pub fn secrets_in(text: &str) -> Vec<String> {
    let Ok(value) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    walk(&value, "", &mut found);
    found
}

fn walk(table: &toml::Table, prefix: &str, found: &mut Vec<String>) {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        if let Some(t) = v.as_table() {
            walk(t, &format!("{path}."), found);
        } else if [
            "secret",
            "password",
            "token",
            "credential",
            "access-key",
            "key-pem",
        ]
        .iter()
        .any(|s| k.to_lowercase().contains(s))
        {
            found.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_command_line() {
        let site = SiteConfig::parse(
            r#"
repository = "s3://backups/fleet"
[s3]
endpoint = "http://127.0.0.1:9000"
[rescue]
unattended = false
after = "poweroff"
[[rescue.disk]]
source = "disk0"
serial = "S1"
"#,
        )
        .unwrap();
        assert_eq!(site.repository.as_deref(), Some("s3://backups/fleet"));
        let mut c = site.rescue;
        assert_eq!(c.after, After::Poweroff);
        c.apply_cmdline("quiet console=ttyS0 bkimg.auto=1 bkimg.point=abc bkimg.target=disk0=/dev/vdb bkimg.after=shell")
            .unwrap();
        c.apply_cmdline("bkimg.ip=10.1.2.3/24 bkimg.gateway=10.1.2.1 bkimg.s3-secret-key=x")
            .unwrap();
        assert_eq!(c.network.address.as_deref(), Some("10.1.2.3/24"));
        assert_eq!(c.network.gateway.as_deref(), Some("10.1.2.1"));
        assert_eq!(c.aws_secret_access_key.as_deref(), Some("x"));
        assert!(c.unattended);
        assert_eq!(c.point.as_deref(), Some("abc"));
        assert_eq!(c.after, After::Shell);
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.disks[0].target, Some(PathBuf::from("/dev/vdb")));
        assert_eq!(c.disks[0].serial, None);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(SiteConfig::parse("[rescue]\nunatended = true")
            .unwrap_err()
            .contains("unatended"));
        let mut c = RescueConfig::default();
        assert!(c
            .apply_cmdline("bkimg.after=halt")
            .unwrap_err()
            .contains("halt"));
        assert!(c
            .apply_cmdline("bkimg.frobnicate=1")
            .unwrap_err()
            .contains("frobnicate"));
        assert!(c
            .apply_cmdline("bkimg.target=/dev/sda")
            .unwrap_err()
            .contains("disk0="));
    }

    #[test]
    fn a_site_partition_overrides_the_built_in_file() {
        let site = SiteConfig::parse_layers(&[
            "repository = \"s3://b/p\"\n[s3]\nregion = \"eu\"\n[rescue]\nunattended = true\nafter = \"poweroff\"\n",
            "[rescue]\naws-access-key-id = \"k\"\nafter = \"reboot\"\n",
        ])
        .unwrap();
        assert_eq!(site.repository.as_deref(), Some("s3://b/p"));
        assert_eq!(site.s3.region.as_deref(), Some("eu"));
        assert!(site.rescue.unattended);
        assert_eq!(site.rescue.after, After::Reboot);
        assert_eq!(site.rescue.aws_access_key_id.as_deref(), Some("k"));
        assert!(SiteConfig::parse_layers(&["", "[rescue]\nunatended = 1\n"])
            .unwrap_err()
            .contains("unatended"));
        assert_eq!(
            settings_in("[rescue]\nafter = \"shell\"\n[rescue.network]\ndns = []\n"),
            ["rescue.after", "rescue.network.dns"]
        );
    }

    #[test]
    fn secrets_are_found() {
        let s = secrets_in(
            "[rescue]\nunattended = true\n[s3]\nsecret-access-key = \"x\"\n[standby]\nkey = \"/etc/k\"\n",
        );
        assert_eq!(s, ["s3.secret-access-key"]);
        let s = secrets_in("[rescue.standby]\nserver-fingerprint = \"ab\"\nkey-pem = \"x\"\n");
        assert_eq!(s, ["rescue.standby.key-pem"]);
        assert!(secrets_in("unattended = true").is_empty());
    }
}
