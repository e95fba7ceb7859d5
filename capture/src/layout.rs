//! Which volumes make up a disk: its partitions and the gaps between them.

use anyhow::Result;
use bkimg_format::manifest::{PartitionTable, VolumeRole};

use crate::source::Source;
use crate::table;

#[derive(Clone, Debug)]
pub struct PlannedVolume {
    pub name: String,
    pub role: VolumeRole,
    pub partition: Option<u32>,
    pub offset: u64,
    pub size: u64,
}

pub struct DiskPlan {
    pub table: PartitionTable,
    pub volumes: Vec<PlannedVolume>,
}

/// Partitions in disk order with a gap volume for every uncovered byte range; a disk
/// without a table is one whole volume.
pub fn plan(source: &Source) -> Result<DiskPlan> {
    let info = table::read(&source.region, source.logical_sector_size)?;
    let size = source.region.len();
    if info.table == PartitionTable::None {
        return Ok(DiskPlan {
            table: info.table,
            volumes: vec![PlannedVolume {
                name: "whole".into(),
                role: VolumeRole::Whole,
                partition: None,
                offset: 0,
                size,
            }],
        });
    }
    let mut parts = info.partitions;
    parts.sort_by_key(|p| p.offset);
    let mut volumes = Vec::new();
    let mut pos = 0u64;
    let mut gaps = 0;
    let mut gap = |volumes: &mut Vec<PlannedVolume>, start: u64, end: u64| {
        volumes.push(PlannedVolume {
            name: format!("gap{gaps}"),
            role: VolumeRole::Gap,
            partition: None,
            offset: start,
            size: end - start,
        });
        gaps += 1;
    };
    for p in parts {
        if p.offset > pos {
            gap(&mut volumes, pos, p.offset);
        }
        volumes.push(PlannedVolume {
            name: format!("p{}", p.number),
            role: VolumeRole::Partition,
            partition: Some(p.number),
            offset: p.offset,
            size: p.size,
        });
        pos = pos.max(p.offset + p.size);
    }
    if pos < size {
        gap(&mut volumes, pos, size);
    }
    Ok(DiskPlan {
        table: info.table,
        volumes,
    })
}
