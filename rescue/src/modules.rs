//! Which kernel modules the recovery image carries, and in which order its init loads them.
//!
//! Debian builds nearly every driver as a module, and the image has no udev: the init
//! loads a fixed list (storage, network, filesystems) with their dependencies first, as
//! `depmod` recorded them in `modules.dep`.

use std::collections::{BTreeMap, BTreeSet};

/// Drivers a machine may need to reach its disks and the repository. Names Debian does not
/// ship in a kernel are reported, not fatal (built in, or gone from that version).
pub const WANTED: &[&str] = &[
    // the crc32c implementations first: libcrc32c (ext4, xfs, btrfs, md) asks the crypto
    // API for one when it loads, which no modules.dep line records
    "crc32c_intel",
    "crc32c_generic",
    // storage controllers and disks
    "nvme",
    "ahci",
    "ata_piix",
    "virtio_blk",
    "virtio_scsi",
    "virtio_pci",
    "sd_mod",
    "sr_mod",
    "mptsas",
    "megaraid_sas",
    "mpt3sas",
    "hpsa",
    "smartpqi",
    "vmw_pvscsi",
    "hv_storvsc",
    "xen_blkfront",
    // USB (the stick itself)
    "xhci_pci",
    "ehci_pci",
    "ohci_pci",
    "uhci_hcd",
    "usb_storage",
    "uas",
    "usbhid",
    "hid_generic",
    // software RAID and device mapper
    "md_mod",
    "raid0",
    "raid1",
    "raid10",
    "raid456",
    "dm_mod",
    // network
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "ice",
    "mlx4_en",
    "mlx5_core",
    "r8169",
    "bnxt_en",
    "tg3",
    "vmxnet3",
    "hv_netvsc",
    "xen_netfront",
    // filesystems: the media, repositories on local disks, UEFI variables
    "isofs",
    "vfat",
    "nls_ascii",
    "nls_cp437",
    "nls_utf8",
    "ext4",
    "xfs",
    "btrfs",
    "efivarfs",
];

/// Dependencies between the modules of one kernel, from its `modules.dep`.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// Module name ("usb_storage") → (path relative to the modules directory, direct and
    /// indirect dependencies as depmod lists them).
    modules: BTreeMap<String, (String, Vec<String>)>,
}

/// The module name of a file ("kernel/drivers/usb/storage/usb-storage.ko.xz" →
/// "usb_storage"): the kernel treats '-' and '_' alike in names.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleDb {
    pub fn parse(modules_dep: &str) -> ModuleDb {
        let mut modules = BTreeMap::new();
        for line in modules_dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(name_of).collect();
            modules.insert(name_of(path), (path.trim().to_string(), deps));
        }
        ModuleDb { modules }
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The files to load for `wanted`, every module after all it depends on, each once;
    /// and the wanted names this kernel has no module for.
    pub fn load_order(&self, wanted: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for name in wanted {
            let name = name.replace('-', "_");
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut seen, &mut order);
            } else {
                missing.push(name);
            }
        }
        (order, missing)
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return; // a dependency depmod named but the kernel lacks: loading reports it
        };
        for dep in deps {
            self.visit(dep, seen, order);
        }
        order.push(path.clone());
    }

    /// The modules `name` needs loaded first (as depmod lists them).
    pub fn deps_of(&self, name: &str) -> &[String] {
        self.modules
            .get(name)
            .map_or(&[], |(_, deps)| deps.as_slice())
    }

    /// A `modules.dep` naming only `paths` (for the image's busybox modprobe, which loads
    /// filesystems on demand).
    pub fn subset(&self, paths: &[String]) -> String {
        let keep: BTreeSet<&str> = paths.iter().map(String::as_str).collect();
        let mut out = String::new();
        for (path, deps) in self.modules.values() {
            if !keep.contains(path.as_str()) {
                continue;
            }
            out.push_str(path);
            out.push(':');
            for dep in deps {
                if let Some((p, _)) = self.modules.get(dep) {
                    out.push(' ');
                    out.push_str(p);
                }
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/usb/storage/uas.ko: kernel/drivers/usb/storage/usb-storage.ko kernel/drivers/scsi/scsi_mod.ko kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/usb/core/usbcore.ko: kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/common/usb-common.ko:
kernel/fs/isofs/isofs.ko.xz:
";

    #[test]
    fn names_ignore_dashes_and_compression() {
        assert_eq!(name_of("kernel/a/usb-storage.ko"), "usb_storage");
        assert_eq!(name_of("kernel/fs/isofs/isofs.ko.xz"), "isofs");
        assert_eq!(name_of("x.ko.zst"), "x");
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let db = ModuleDb::parse(DEP);
        assert_eq!(db.len(), 7);
        let (order, missing) = db.load_order(&["uas", "usb-storage", "isofs", "nvme"]);
        assert_eq!(missing, ["nvme"]);
        let pos = |n: &str| order.iter().position(|p| name_of(p) == n).unwrap();
        assert_eq!(order.len(), 7);
        assert!(pos("scsi_common") < pos("scsi_mod"));
        assert!(pos("usb_common") < pos("usbcore"));
        assert!(pos("usbcore") < pos("usb_storage"));
        assert!(pos("scsi_mod") < pos("usb_storage"));
        assert!(pos("usb_storage") < pos("uas"));
    }

    #[test]
    fn subset_keeps_only_carried_modules() {
        let db = ModuleDb::parse(DEP);
        let (order, _) = db.load_order(&["usb_storage"]);
        let sub = ModuleDb::parse(&db.subset(&order));
        assert_eq!(sub.len(), 5);
        let (again, missing) = sub.load_order(&["usb_storage"]);
        assert!(missing.is_empty());
        assert_eq!(again.len(), 5);
    }
}
