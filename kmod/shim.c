// SPDX-License-Identifier: GPL-2.0
/*
 * bksnap C shim: the parts of the module that Linux 6.12's Rust bindings cannot express.
 * It holds no policy; bksnap.rs decides everything.
 *
 * - the write hook: an ftrace handler on submit_bio_noacct() that sends every write to a
 *   tracked device through bksnap_rs_write() before the write is submitted;
 * - the tracked-device slots: lookup from a bio, an SRCU section around every use, and
 *   a per-slot percpu rw-semaphore that snapshot activation takes for writing;
 * - deferral of bios that arrive where we must not sleep (nested submission, atomic
 *   context, REQ_NOWAIT) to a worker;
 * - block-device handles, synchronous reads and writes with a timeout, freeze/thaw;
 * - the read-only snapshot image disks (bio-based gendisks) and the misc control device.
 */
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/blk-mq.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/ftrace.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/percpu-rwsem.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/srcu.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>

/* Implemented in Rust (bksnap.rs). */
int bksnap_rs_write(void *tracker, u64 sector, u64 sectors, bool may_block);
void bksnap_rs_mark(void *tracker, u64 sector, u64 sectors);
long bksnap_rs_ioctl(void *state, unsigned int cmd, unsigned long arg);
int bksnap_rs_image_read(void *image, void *bio, u64 sector, u64 sectors);
void bksnap_rs_cow_work(void *item);

/* Called from Rust. */
int bksnap_c_init(void *state);
void bksnap_c_exit(void);
void bksnap_c_module_get(void);
void bksnap_c_module_put(void);
void *bksnap_c_bdev_open(u32 major, u32 minor, bool write, int *err);
void bksnap_c_bdev_close(void *file);
u64 bksnap_c_bdev_sectors(void *file);
void bksnap_c_bdev_span(void *file, u64 *disk, u64 *start);
u32 bksnap_c_bdev_block_size(void *file);
int bksnap_c_bdev_freeze(void *file);
void bksnap_c_bdev_thaw(void *file);
void bksnap_c_mark_written(void *file, u64 sector, u64 sectors);
void bksnap_c_queue_freeze(void *file);
void bksnap_c_queue_unfreeze(void *file);
int bksnap_c_rw(void *file, u64 sector, void *buf, u32 len, bool write, u32 timeout_ms);
void *bksnap_c_buf_alloc(u32 len);
void bksnap_c_buf_free(void *buf);
int bksnap_c_slot_add(void *file, void *tracker);
void bksnap_c_slot_remove(int slot);
void bksnap_c_slot_lock(int slot);
void bksnap_c_slot_unlock(int slot);
void *bksnap_c_image_alloc(void);
int bksnap_c_image_add_disk(void *image, void *rs, void *origin, u64 id, u32 index,
			    u32 *major, u32 *minor);
void bksnap_c_image_destroy(void *disk);
void bksnap_c_image_lock_read(void *disk);
void bksnap_c_image_unlock_read(void *disk);
void bksnap_c_image_lock_write(void *disk);
void bksnap_c_image_unlock_write(void *disk);
int bksnap_c_bio_read_span(void *bio, u64 offset, u64 sectors, void *file, u64 sector);
void bksnap_c_random(u8 *buf, u32 len);
int bksnap_c_cow_queue(void *item);
void bksnap_c_cow_flush(void);

#define BKSNAP_SLOTS 32

struct bksnap_slot {
	bool used;
	struct gendisk *disk;
	sector_t start;	/* first sector of the tracked device on its disk */
	sector_t len;
	void *tracker;
	struct percpu_rw_semaphore lock;
};

static struct bksnap_slot slots[BKSNAP_SLOTS];
/*
 * One lockdep class per slot: snapshot activation takes several slots' locks for writing,
 * and a write touching several tracked devices takes their locks for reading, always in
 * ascending slot order; one shared class would read as recursive locking.
 */
static struct lock_class_key slot_lock_keys[BKSNAP_SLOTS];
static DEFINE_MUTEX(slots_mutex);
DEFINE_STATIC_SRCU(bksnap_srcu);
static void *rs_state;
static struct workqueue_struct *defer_wq;
static struct workqueue_struct *image_wq;
static struct workqueue_struct *cow_wq;
static struct bio_set image_bioset;

static DEFINE_SPINLOCK(defer_lock);
static struct bio_list defer_list;
static void defer_work_fn(struct work_struct *work);
static DECLARE_WORK(defer_work, defer_work_fn);

/* ---------------------------------------------------------------- write hook */

/* Which slots a write touches, and where, relative to each tracked device. */
struct bksnap_hit {
	int slot;
	u64 sector;
	u64 sectors;
};

static int bksnap_match_range(struct block_device *bdev, u64 start, u64 sectors,
			      struct bksnap_hit *hits)
{
	u64 end = start + sectors;
	int i, n = 0;

	for (i = 0; i < BKSNAP_SLOTS; i++) {
		struct bksnap_slot *s = &slots[i];
		u64 lo, hi;

		/* Pairs with the release in bksnap_c_slot_add: the fields below are set. */
		if (!smp_load_acquire(&s->used) || READ_ONCE(s->disk) != bdev->bd_disk)
			continue;
		lo = max_t(u64, start, s->start);
		hi = min_t(u64, end, s->start + s->len);
		if (lo >= hi)
			continue;
		hits[n].slot = i;
		hits[n].sector = lo - s->start;
		hits[n].sectors = hi - lo;
		n++;
	}
	return n;
}

static int bksnap_match(struct bio *bio, struct bksnap_hit *hits)
{
	struct block_device *bdev = bio->bi_bdev;
	u64 start = bio->bi_iter.bi_sector;

	if (!bio_flagged(bio, BIO_REMAPPED) && bdev_is_partition(bdev))
		start += bdev->bd_start_sect;
	return bksnap_match_range(bdev, start, bio_sectors(bio), hits);
}

/*
 * The module's own writes (to a difference store) skip the hook; a store on a tracked
 * device still marks the blocks it wrote as changed (no copy-on-write: the store must
 * never copy itself).
 */
void bksnap_c_mark_written(void *file, u64 sector, u64 sectors)
{
	struct block_device *bdev = file_bdev(file);
	struct bksnap_hit hits[BKSNAP_SLOTS];
	int i, n, idx;

	if (bdev_is_partition(bdev))
		sector += bdev->bd_start_sect;
	idx = srcu_read_lock(&bksnap_srcu);
	n = bksnap_match_range(bdev, sector, sectors, hits);
	for (i = 0; i < n; i++)
		bksnap_rs_mark(slots[hits[i].slot].tracker, hits[i].sector, hits[i].sectors);
	srcu_read_unlock(&bksnap_srcu, idx);
}

static bool bksnap_modifies(struct bio *bio)
{
	return op_is_write(bio_op(bio)) && bio_sectors(bio) > 0;
}

/*
 * Runs every tracker the bio touches (@hits, from bksnap_match under the same SRCU
 * read lock), then submits it. With may_block false, returns false (and does nothing) when a tracker would have
 * to sleep: the caller defers the bio to the worker.
 */
static bool bksnap_process(struct bio *bio, const struct bksnap_hit *hits, int n,
			   bool may_block)
{
	unsigned int noio;
	int i, locked = 0;
	bool done = true;

	for (i = 0; i < n; i++) {
		struct percpu_rw_semaphore *lock = &slots[hits[i].slot].lock;

		if (may_block)
			percpu_down_read(lock);
		else if (!percpu_down_read_trylock(lock)) {
			done = false;
			break;
		}
		locked++;
	}
	noio = memalloc_noio_save();
	for (i = 0; done && i < n; i++) {
		if (bksnap_rs_write(slots[hits[i].slot].tracker, hits[i].sector,
				    hits[i].sectors, may_block) > 0)
			done = false;
	}
	memalloc_noio_restore(noio);
	if (done)
		submit_bio_noacct(bio); /* from this module: the hook lets it through */
	for (i = 0; i < locked; i++)
		percpu_up_read(&slots[hits[i].slot].lock);
	return done;
}

static void defer_work_fn(struct work_struct *work)
{
	for (;;) {
		struct bksnap_hit hits[BKSNAP_SLOTS];
		struct bio *bio;
		int idx;

		spin_lock_irq(&defer_lock);
		bio = bio_list_pop(&defer_list);
		spin_unlock_irq(&defer_lock);
		if (!bio)
			return;
		idx = srcu_read_lock(&bksnap_srcu);
		bksnap_process(bio, hits, bksnap_match(bio, hits), true);
		srcu_read_unlock(&bksnap_srcu, idx);
	}
}

static void bksnap_defer(struct bio *bio)
{
	unsigned long flags;

	spin_lock_irqsave(&defer_lock, flags);
	bio_list_add(&defer_list, bio);
	spin_unlock_irqrestore(&defer_lock, flags);
	queue_work(defer_wq, &defer_work);
}

/*
 * Every bio submitted anywhere comes through here. The whole body, the pass-through
 * submissions included (they may sleep), runs inside the SRCU read section that module
 * exit waits for: no task can be asleep in a call from this function when its code is
 * freed. The few instructions before the lock and after the unlock never sleep; the
 * ftrace unregistration's tasks-RCU grace period covers them.
 */
static void notrace bksnap_submit_bio_noacct(struct bio *bio)
{
	struct bksnap_hit hits[BKSNAP_SLOTS];
	bool atomic, nested;
	int idx, n = 0;

	idx = srcu_read_lock(&bksnap_srcu);
	if (bksnap_modifies(bio))
		n = bksnap_match(bio, hits);
	if (!n) {
		submit_bio_noacct(bio);
	} else {
		atomic = !in_task() || irqs_disabled() || in_atomic();
		nested = current->bio_list || (bio->bi_opf & REQ_NOWAIT);
		if (atomic || !bksnap_process(bio, hits, n, !nested))
			bksnap_defer(bio);
	}
	srcu_read_unlock(&bksnap_srcu, idx);
}

static void notrace bksnap_ftrace_handler(unsigned long ip, unsigned long parent_ip,
					  struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	/* Calls from this module (its own I/O, and resubmission above) go through. */
	if (within_module(parent_ip, THIS_MODULE))
		return;
	ftrace_regs_set_instruction_pointer(fregs, (unsigned long)bksnap_submit_bio_noacct);
}

static struct ftrace_ops bksnap_ftrace_ops = {
	.func = bksnap_ftrace_handler,
	.flags = FTRACE_OPS_FL_IPMODIFY,
};

/* ---------------------------------------------------------------- slots */

int bksnap_c_slot_add(void *file, void *tracker)
{
	struct block_device *bdev = file_bdev(file);
	int i, ret = -ENOSPC;

	mutex_lock(&slots_mutex);
	for (i = 0; i < BKSNAP_SLOTS; i++) {
		struct bksnap_slot *s = &slots[i];

		if (s->used)
			continue;
		ret = __percpu_init_rwsem(&s->lock, "bksnap_slot", &slot_lock_keys[i]);
		if (ret)
			break;
		s->disk = bdev->bd_disk;
		s->start = bdev_is_partition(bdev) ? bdev->bd_start_sect : 0;
		s->len = bdev_nr_sectors(bdev);
		s->tracker = tracker;
		smp_store_release(&s->used, true);
		ret = i;
		break;
	}
	mutex_unlock(&slots_mutex);
	/* Writes already on their way past the lookup are seen once this returns. */
	synchronize_srcu(&bksnap_srcu);
	return ret;
}

void bksnap_c_slot_remove(int slot)
{
	struct bksnap_slot *s = &slots[slot];

	mutex_lock(&slots_mutex);
	WRITE_ONCE(s->used, false);
	mutex_unlock(&slots_mutex);
	/*
	 * No hook or deferral worker is still inside this slot's tracker or lock once this
	 * returns: both match slots inside the SRCU read lock, and none matches it now.
	 */
	synchronize_srcu(&bksnap_srcu);
	percpu_free_rwsem(&s->lock);
	s->disk = NULL;
	s->tracker = NULL;
}

void bksnap_c_slot_lock(int slot)
{
	percpu_down_write(&slots[slot].lock);
}

void bksnap_c_slot_unlock(int slot)
{
	percpu_up_write(&slots[slot].lock);
}

/* ---------------------------------------------------------------- block devices */

void bksnap_c_module_get(void)
{
	__module_get(THIS_MODULE);
}

void bksnap_c_module_put(void)
{
	module_put(THIS_MODULE);
}

void *bksnap_c_bdev_open(u32 major, u32 minor, bool write, int *err)
{
	blk_mode_t mode = BLK_OPEN_READ | (write ? BLK_OPEN_WRITE : 0);
	struct file *f;

	if (major > 0xfff || minor > 0xfffff) {
		*err = -EINVAL;
		return NULL;
	}
	f = bdev_file_open_by_dev(MKDEV(major, minor), mode, NULL, NULL);
	if (IS_ERR(f)) {
		*err = PTR_ERR(f);
		return NULL;
	}
	*err = 0;
	return f;
}

void bksnap_c_bdev_close(void *file)
{
	fput(file);
}

u64 bksnap_c_bdev_sectors(void *file)
{
	return bdev_nr_sectors(file_bdev(file));
}

/*
 * Where the device lies on its disk: an identity of the disk (stable while the file is
 * open) and the first sector. Partitions of one disk overlap it and each other by these.
 */
void bksnap_c_bdev_span(void *file, u64 *disk, u64 *start)
{
	struct block_device *bdev = file_bdev(file);

	*disk = (u64)(unsigned long)bdev->bd_disk;
	*start = bdev_is_partition(bdev) ? bdev->bd_start_sect : 0;
}

u32 bksnap_c_bdev_block_size(void *file)
{
	return bdev_logical_block_size(file_bdev(file));
}

/*
 * Freezes the filesystem on the device and, for a whole disk, those on its partitions
 * (freezing a disk does not reach filesystems on its partitions).
 */
int bksnap_c_bdev_freeze(void *file)
{
	struct block_device *bdev = file_bdev(file);
	struct block_device *part;
	unsigned long idx;
	int ret;

	ret = bdev_freeze(bdev);
	if (ret || bdev_is_partition(bdev))
		return ret;
	xa_for_each_start(&bdev->bd_disk->part_tbl, idx, part, 1) {
		ret = bdev_freeze(part);
		if (ret) {
			unsigned long failed = idx;

			xa_for_each_range(&bdev->bd_disk->part_tbl, idx, part, 1, failed - 1)
				bdev_thaw(part);
			bdev_thaw(bdev);
			return ret;
		}
	}
	return 0;
}

void bksnap_c_bdev_thaw(void *file)
{
	struct block_device *bdev = file_bdev(file);
	struct block_device *part;
	unsigned long idx;

	if (!bdev_is_partition(bdev)) {
		xa_for_each_start(&bdev->bd_disk->part_tbl, idx, part, 1)
			bdev_thaw(part);
	}
	bdev_thaw(bdev);
}

void bksnap_c_queue_freeze(void *file)
{
	blk_mq_freeze_queue(bdev_get_queue(file_bdev(file)));
}

void bksnap_c_queue_unfreeze(void *file)
{
	blk_mq_unfreeze_queue(bdev_get_queue(file_bdev(file)));
}

void *bksnap_c_buf_alloc(u32 len)
{
	return vmalloc(len);
}

void bksnap_c_buf_free(void *buf)
{
	vfree(buf);
}

void bksnap_c_random(u8 *buf, u32 len)
{
	get_random_bytes(buf, len);
}

/*
 * A synchronous read or write with a time limit. The completion context is shared with
 * the end_io handler; on timeout the handler frees it and the caller must leak @buf (the
 * device may still write into it).
 */
struct bksnap_io {
	struct completion done;
	refcount_t ref;
	blk_status_t status;
};

static void bksnap_io_end(struct bio *bio)
{
	struct bksnap_io *io = bio->bi_private;

	io->status = bio->bi_status;
	complete(&io->done);
	if (refcount_dec_and_test(&io->ref))
		kfree(io);
	bio_put(bio);
}

int bksnap_c_rw(void *file, u64 sector, void *buf, u32 len, bool write, u32 timeout_ms)
{
	struct block_device *bdev = file_bdev(file);
	unsigned int nr = DIV_ROUND_UP(len, PAGE_SIZE);
	struct bksnap_io *io;
	struct bio *bio;
	u32 done;
	int ret;

	if (!len || len % SECTOR_SIZE || nr > BIO_MAX_VECS || !is_vmalloc_addr(buf) ||
	    offset_in_page(buf))
		return -EINVAL;
	io = kmalloc(sizeof(*io), GFP_NOIO);
	if (!io)
		return -ENOMEM;
	init_completion(&io->done);
	refcount_set(&io->ref, 2);
	io->status = BLK_STS_OK;
	bio = bio_alloc(bdev, nr, write ? REQ_OP_WRITE | REQ_SYNC : REQ_OP_READ, GFP_NOIO);
	bio->bi_iter.bi_sector = sector;
	bio->bi_private = io;
	bio->bi_end_io = bksnap_io_end;
	for (done = 0; done < len; done += PAGE_SIZE) {
		u32 n = min_t(u32, PAGE_SIZE, len - done);

		if (bio_add_page(bio, vmalloc_to_page(buf + done), n, 0) != n) {
			bio_put(bio);
			kfree(io);
			return -EIO;
		}
	}
	if (write)
		flush_kernel_vmap_range(buf, len);
	submit_bio_noacct(bio);
	if (!wait_for_completion_io_timeout(&io->done, msecs_to_jiffies(timeout_ms))) {
		if (refcount_dec_and_test(&io->ref))
			kfree(io);
		return -ETIMEDOUT;
	}
	if (!write)
		invalidate_kernel_vmap_range(buf, len);
	ret = blk_status_to_errno(io->status);
	if (refcount_dec_and_test(&io->ref))
		kfree(io);
	return ret;
}

/*
 * Difference-store writes that run after the write that caused them was released: the
 * old data is already in memory (the Rust item owns it); the item runs once, here.
 */
struct bksnap_cow_work {
	struct work_struct work;
	void *item;
};

static void bksnap_cow_fn(struct work_struct *work)
{
	struct bksnap_cow_work *cw = container_of(work, struct bksnap_cow_work, work);
	void *item = cw->item;

	kfree(cw);
	bksnap_rs_cow_work(item);
}

int bksnap_c_cow_queue(void *item)
{
	struct bksnap_cow_work *cw = kmalloc(sizeof(*cw), GFP_NOIO);

	if (!cw)
		return -ENOMEM;
	INIT_WORK(&cw->work, bksnap_cow_fn);
	cw->item = item;
	queue_work(cow_wq, &cw->work);
	return 0;
}

void bksnap_c_cow_flush(void)
{
	flush_workqueue(cow_wq);
}

/* ---------------------------------------------------------------- snapshot images */

struct bksnap_image {
	void *rs;		/* the Rust image */
	struct gendisk *disk;
	struct rw_semaphore cow;	/* read: image reads of an origin range; write: a copy */
	atomic_t inflight;
	wait_queue_head_t idle;
};

struct bksnap_image_io {
	struct work_struct work;
	struct bksnap_image *image;
	struct bio *bio;
};

static void bksnap_image_work(struct work_struct *work)
{
	struct bksnap_image_io *io = container_of(work, struct bksnap_image_io, work);
	struct bksnap_image *image = io->image;
	struct bio *bio = io->bio;
	int ret;

	ret = bksnap_rs_image_read(image->rs, bio, bio->bi_iter.bi_sector, bio_sectors(bio));
	bio->bi_status = errno_to_blk_status(ret);
	bio_endio(bio);
	kfree(io);
	if (atomic_dec_and_test(&image->inflight))
		wake_up_all(&image->idle);
}

static void bksnap_image_submit_bio(struct bio *bio)
{
	struct bksnap_image *image = bio->bi_bdev->bd_disk->private_data;
	struct bksnap_image_io *io;

	if (bio_op(bio) != REQ_OP_READ) {
		/* Flushes carry nothing to do; anything else is a write to a read-only disk. */
		if (bio_op(bio) != REQ_OP_FLUSH)
			bio->bi_status = BLK_STS_IOERR;
		bio_endio(bio);
		return;
	}
	io = kmalloc(sizeof(*io), GFP_NOIO);
	if (!io) {
		bio->bi_status = BLK_STS_RESOURCE;
		bio_endio(bio);
		return;
	}
	atomic_inc(&image->inflight);
	io->image = image;
	io->bio = bio;
	INIT_WORK(&io->work, bksnap_image_work);
	queue_work(image_wq, &io->work);
}

static const struct block_device_operations bksnap_image_fops = {
	.owner = THIS_MODULE,
	.submit_bio = bksnap_image_submit_bio,
};

void *bksnap_c_image_alloc(void)
{
	struct bksnap_image *image = kzalloc(sizeof(*image), GFP_KERNEL);

	if (!image)
		return NULL;
	init_rwsem(&image->cow);
	atomic_set(&image->inflight, 0);
	init_waitqueue_head(&image->idle);
	return image;
}

int bksnap_c_image_add_disk(void *p, void *rs, void *origin, u64 id, u32 index,
			    u32 *major, u32 *minor)
{
	struct bksnap_image *image = p;
	struct block_device *obdev = file_bdev(origin);
	struct queue_limits lim = {
		.logical_block_size = bdev_logical_block_size(obdev),
		.physical_block_size = bdev_physical_block_size(obdev),
		.io_min = bdev_io_min(obdev),
	};
	struct gendisk *disk;
	int ret;

	if (image->disk)
		return -EBUSY;
	disk = blk_alloc_disk(&lim, NUMA_NO_NODE);
	if (IS_ERR(disk))
		return PTR_ERR(disk);
	image->rs = rs;
	disk->fops = &bksnap_image_fops;
	disk->private_data = image;
	disk->flags |= GENHD_FL_NO_PART;
	snprintf(disk->disk_name, DISK_NAME_LEN, "bksnap%llu-%u", id, index);
	set_capacity(disk, bdev_nr_sectors(obdev));
	set_disk_ro(disk, true);
	ret = add_disk(disk);
	if (ret) {
		put_disk(disk);
		return ret;
	}
	image->disk = disk;
	*major = disk->major;
	*minor = disk->first_minor;
	return 0;
}

void bksnap_c_image_destroy(void *p)
{
	struct bksnap_image *image = p;

	if (image->disk) {
		del_gendisk(image->disk);
		wait_event(image->idle, atomic_read(&image->inflight) == 0);
		put_disk(image->disk);
	}
	kfree(image);
}

void bksnap_c_image_lock_read(void *p)
{
	down_read(&((struct bksnap_image *)p)->cow);
}

void bksnap_c_image_unlock_read(void *p)
{
	up_read(&((struct bksnap_image *)p)->cow);
}

void bksnap_c_image_lock_write(void *p)
{
	down_write(&((struct bksnap_image *)p)->cow);
}

void bksnap_c_image_unlock_write(void *p)
{
	up_write(&((struct bksnap_image *)p)->cow);
}

/* Reads @sectors sectors of @bio, from @offset sectors into it, from @file at @sector. */
int bksnap_c_bio_read_span(void *p, u64 offset, u64 sectors, void *file, u64 sector)
{
	struct bio *bio = p;
	struct bio *clone;
	int ret;

	clone = bio_alloc_clone(file_bdev(file), bio, GFP_NOIO, &image_bioset);
	if (!clone)
		return -ENOMEM;
	bio_trim(clone, offset, sectors);
	clone->bi_iter.bi_sector = sector;
	clone->bi_opf = REQ_OP_READ;
	ret = submit_bio_wait(clone);
	bio_put(clone);
	return ret;
}

/* ---------------------------------------------------------------- control device */

static long bksnap_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	return bksnap_rs_ioctl(rs_state, cmd, arg);
}

static const struct file_operations bksnap_ctl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = bksnap_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice bksnap_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "bksnap",
	.fops = &bksnap_ctl_fops,
	.mode = 0600,
};

int bksnap_c_init(void *state)
{
	int ret;

	rs_state = state;
	bio_list_init(&defer_list);
	ret = bioset_init(&image_bioset, BIO_POOL_SIZE, 0, 0);
	if (ret)
		return ret;
	defer_wq = alloc_workqueue("bksnap_defer", WQ_MEM_RECLAIM | WQ_UNBOUND, 1);
	image_wq = alloc_workqueue("bksnap_image", WQ_MEM_RECLAIM | WQ_UNBOUND, 0);
	cow_wq = alloc_workqueue("bksnap_cow", WQ_MEM_RECLAIM | WQ_UNBOUND, 0);
	if (!defer_wq || !image_wq || !cow_wq) {
		ret = -ENOMEM;
		goto fail;
	}
	ret = ftrace_set_filter_ip(&bksnap_ftrace_ops, (unsigned long)submit_bio_noacct, 0, 0);
	if (ret)
		goto fail;
	ret = register_ftrace_function(&bksnap_ftrace_ops);
	if (ret)
		goto fail_filter;
	ret = misc_register(&bksnap_misc);
	if (ret)
		goto fail_ftrace;
	return 0;

fail_ftrace:
	unregister_ftrace_function(&bksnap_ftrace_ops);
fail_filter:
	ftrace_set_filter_ip(&bksnap_ftrace_ops, (unsigned long)submit_bio_noacct, 1, 0);
fail:
	if (cow_wq)
		destroy_workqueue(cow_wq);
	if (image_wq)
		destroy_workqueue(image_wq);
	if (defer_wq)
		destroy_workqueue(defer_wq);
	bioset_exit(&image_bioset);
	return ret;
}

void bksnap_c_exit(void)
{
	misc_deregister(&bksnap_misc);
	unregister_ftrace_function(&bksnap_ftrace_ops);
	ftrace_set_filter_ip(&bksnap_ftrace_ops, (unsigned long)submit_bio_noacct, 1, 0);
	/* Wait for every task still inside the redirected function. */
	synchronize_srcu(&bksnap_srcu);
	flush_work(&defer_work);
	destroy_workqueue(defer_wq);
	destroy_workqueue(cow_wq);
	destroy_workqueue(image_wq);
	bioset_exit(&image_bioset);
}
