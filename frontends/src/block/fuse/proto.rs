//! The FUSE wire protocol: the part of `include/uapi/linux/fuse.h`
//! (protocol 7.45) a file server of block volumes needs, as `#[repr(C)]`
//! structs with safe encoding to and from bytes. Sizes are checked against
//! fuse.h in the tests below.

/// Protocol version we speak.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 45;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

// Opcodes (`enum fuse_opcode`).
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;
pub const SYNCFS: u32 = 50;
pub const TMPFILE: u32 = 51;
pub const STATX: u32 = 52;

// Notifications (written with unique 0, the code in `error`).
pub const NOTIFY_INVAL_INODE: i32 = 2;
pub const NOTIFY_INVAL_ENTRY: i32 = 3;
pub const NOTIFY_RESEND: i32 = 7;

/// The kernel sets this bit of `unique` on a request it re-sends after
/// FUSE_NOTIFY_RESEND (the request may have been seen before).
pub const UNIQUE_RESEND: u64 = 1 << 63;

// INIT flags; bits 32 and up travel in `flags2` (with INIT_EXT).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
pub const ASYNC_DIO: u64 = 1 << 15;
pub const PARALLEL_DIROPS: u64 = 1 << 18;
pub const MAX_PAGES: u64 = 1 << 22;
pub const INIT_EXT: u64 = 1 << 30;
pub const HAS_RESEND: u64 = 1 << 39;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR valid bits.
pub const FATTR_SIZE: u32 = 1 << 3;

// FSYNC flags.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;

/// `FUSE_DEV_IOC_CLONE` = `_IOR(229, 0, uint32_t)`.
pub const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// Marker for wire structs valid for any bit pattern, without padding.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have only integer fields (or arrays of
/// them) and no implicit padding.
pub unsafe trait Pod: Copy + Default {}

/// A `T` from the start of `buf` (any alignment); None if too short.
pub fn read<T: Pod>(buf: &[u8]) -> Option<T> {
    if buf.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above; T: Pod accepts any bit pattern;
    // read_unaligned tolerates any alignment of the source.
    Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// The bytes of `v`.
pub fn bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T: Pod has no padding, so every byte of the value is
    // initialized; the slice borrows `v` for its lifetime.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

macro_rules! pod {
    ($($(#[$m:meta])* pub struct $n:ident { $(pub $f:ident : $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $n { $(pub $f: $t),* }
        // SAFETY: repr(C) with integer fields only, laid out as in fuse.h
        // with its explicit padding fields; the sizes are asserted in the
        // tests below.
        unsafe impl Pod for $n {}
    )*};
}

pod! {
    /// `struct fuse_in_header`.
    pub struct InHeader { pub len: u32, pub opcode: u32, pub unique: u64, pub nodeid: u64,
        pub uid: u32, pub gid: u32, pub pid: u32, pub total_extlen: u16, pub padding: u16 }
    /// `struct fuse_out_header`.
    pub struct OutHeader { pub len: u32, pub error: i32, pub unique: u64 }
    /// `struct fuse_init_in`.
    pub struct InitIn { pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32,
        pub flags2: u32, pub unused: [u32; 11] }
    /// `struct fuse_init_out`.
    pub struct InitOut { pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32,
        pub max_background: u16, pub congestion_threshold: u16, pub max_write: u32,
        pub time_gran: u32, pub max_pages: u16, pub map_alignment: u16, pub flags2: u32,
        pub max_stack_depth: u32, pub request_timeout: u16, pub unused: [u16; 11] }
    /// `struct fuse_attr`.
    pub struct Attr { pub ino: u64, pub size: u64, pub blocks: u64, pub atime: u64, pub mtime: u64,
        pub ctime: u64, pub atimensec: u32, pub mtimensec: u32, pub ctimensec: u32, pub mode: u32,
        pub nlink: u32, pub uid: u32, pub gid: u32, pub rdev: u32, pub blksize: u32, pub flags: u32 }
    /// `struct fuse_entry_out`.
    pub struct EntryOut { pub nodeid: u64, pub generation: u64, pub entry_valid: u64,
        pub attr_valid: u64, pub entry_valid_nsec: u32, pub attr_valid_nsec: u32, pub attr: Attr }
    /// `struct fuse_attr_out`.
    pub struct AttrOut { pub attr_valid: u64, pub attr_valid_nsec: u32, pub dummy: u32, pub attr: Attr }
    /// `struct fuse_setattr_in`.
    pub struct SetattrIn { pub valid: u32, pub padding: u32, pub fh: u64, pub size: u64,
        pub lock_owner: u64, pub atime: u64, pub mtime: u64, pub ctime: u64, pub atimensec: u32,
        pub mtimensec: u32, pub ctimensec: u32, pub mode: u32, pub unused4: u32, pub uid: u32,
        pub gid: u32, pub unused5: u32 }
    /// `struct fuse_open_out`.
    pub struct OpenOut { pub fh: u64, pub open_flags: u32, pub backing_id: i32 }
    /// `struct fuse_read_in` (READ and READDIR).
    pub struct ReadIn { pub fh: u64, pub offset: u64, pub size: u32, pub read_flags: u32,
        pub lock_owner: u64, pub flags: u32, pub padding: u32 }
    /// `struct fuse_write_in`.
    pub struct WriteIn { pub fh: u64, pub offset: u64, pub size: u32, pub write_flags: u32,
        pub lock_owner: u64, pub flags: u32, pub padding: u32 }
    /// `struct fuse_write_out`.
    pub struct WriteOut { pub size: u32, pub padding: u32 }
    /// `struct fuse_kstatfs` (the STATFS reply is `struct fuse_statfs_out`, the same bytes).
    pub struct Kstatfs { pub blocks: u64, pub bfree: u64, pub bavail: u64, pub files: u64,
        pub ffree: u64, pub bsize: u32, pub namelen: u32, pub frsize: u32, pub padding: u32,
        pub spare: [u32; 6] }
    /// `struct fuse_fsync_in`.
    pub struct FsyncIn { pub fh: u64, pub fsync_flags: u32, pub padding: u32 }
    /// `struct fuse_fallocate_in`.
    pub struct FallocateIn { pub fh: u64, pub offset: u64, pub length: u64, pub mode: u32,
        pub padding: u32 }
    /// `struct fuse_lseek_in`.
    pub struct LseekIn { pub fh: u64, pub offset: u64, pub whence: u32, pub padding: u32 }
    /// `struct fuse_lseek_out`.
    pub struct LseekOut { pub offset: u64 }
    /// `struct fuse_dirent` without its name.
    pub struct DirentHead { pub ino: u64, pub off: u64, pub namelen: u32, pub typ: u32 }
    /// `struct fuse_notify_inval_inode_out`.
    pub struct NotifyInvalInode { pub ino: u64, pub off: i64, pub len: i64 }
    /// `struct fuse_notify_inval_entry_out` (the name and a NUL follow).
    pub struct NotifyInvalEntry { pub parent: u64, pub namelen: u32, pub flags: u32 }
}

/// The bytes of a request that come before a WRITE's data: its header and
/// `fuse_write_in`. A request is read into this much header space first,
/// so a WRITE's data lands at the start of the data buffer.
pub const WRITE_HEAD: usize = size_of::<InHeader>() + size_of::<WriteIn>();

/// Encodes one directory entry (8-byte aligned record) at the start of
/// `out`. Returns the bytes used, or None if it does not fit.
pub fn put_dirent(out: &mut [u8], ino: u64, off: u64, typ: u32, name: &[u8]) -> Option<usize> {
    let head = DirentHead {
        ino,
        off,
        namelen: u32::try_from(name.len()).ok()?,
        typ,
    };
    let len = (size_of::<DirentHead>() + name.len() + 7) & !7;
    if out.len() < len {
        return None;
    }
    let h = bytes(&head);
    out[..h.len()].copy_from_slice(h);
    out[h.len()..h.len() + name.len()].copy_from_slice(name);
    out[h.len() + name.len()..len].fill(0);
    Some(len)
}

/// A notification message: header (unique 0, `code` in `error`), `body`
/// and `tail` (a name with its NUL, for entry notifications).
pub fn notification(code: i32, body: &[u8], tail: &[u8]) -> Vec<u8> {
    let len = size_of::<OutHeader>() + body.len() + tail.len();
    let h = OutHeader {
        len: len as u32,
        error: code,
        unique: 0,
    };
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(bytes(&h));
    v.extend_from_slice(body);
    v.extend_from_slice(tail);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_fuse_h() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<WriteOut>(), 8);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<FsyncIn>(), 16);
        assert_eq!(size_of::<FallocateIn>(), 32);
        assert_eq!(size_of::<LseekIn>(), 24);
        assert_eq!(size_of::<LseekOut>(), 8);
        assert_eq!(size_of::<DirentHead>(), 24);
        assert_eq!(size_of::<NotifyInvalInode>(), 24);
        assert_eq!(size_of::<NotifyInvalEntry>(), 16);
        assert_eq!(WRITE_HEAD, 80);
    }

    #[test]
    fn fields_sit_where_fuse_h_puts_them() {
        let h = InHeader {
            len: 0x11223344,
            opcode: WRITE,
            unique: 0x0102030405060708,
            nodeid: 9,
            ..Default::default()
        };
        let b = bytes(&h);
        assert_eq!(&b[0..4], &0x11223344u32.to_ne_bytes());
        assert_eq!(&b[4..8], &WRITE.to_ne_bytes());
        assert_eq!(&b[8..16], &0x0102030405060708u64.to_ne_bytes());
        assert_eq!(&b[16..24], &9u64.to_ne_bytes());
        assert_eq!(read::<InHeader>(b), Some(h));
        assert_eq!(read::<InHeader>(&b[..39]), None, "too short");
        let o = InitOut {
            max_write: 1 << 20,
            max_pages: 256,
            flags2: 1,
            ..Default::default()
        };
        let b = bytes(&o);
        assert_eq!(&b[20..24], &(1u32 << 20).to_ne_bytes(), "max_write");
        assert_eq!(&b[28..30], &256u16.to_ne_bytes(), "max_pages");
        assert_eq!(&b[32..36], &1u32.to_ne_bytes(), "flags2");
    }

    #[test]
    fn dirents_are_8_byte_aligned() {
        let mut b = [0xffu8; 64];
        assert_eq!(put_dirent(&mut b, 1, 1, 4, b"."), Some(32));
        assert_eq!(&b[25..32], &[0; 7], "padding is zeroed");
        assert_eq!(put_dirent(&mut b, 1, 1, 4, b"abcdefgh"), Some(32));
        assert_eq!(put_dirent(&mut b, 1, 1, 4, b"abcdefghi"), Some(40));
        assert_eq!(put_dirent(&mut b[..39], 1, 1, 4, b"abcdefghi"), None);
    }

    #[test]
    fn notifications_carry_their_code_and_length() {
        let body = NotifyInvalEntry {
            parent: ROOT_ID,
            namelen: 3,
            flags: 0,
        };
        let n = notification(NOTIFY_INVAL_ENTRY, bytes(&body), b"vol\0");
        assert_eq!(n.len(), 16 + 16 + 4);
        let h: OutHeader = read(&n).unwrap();
        assert_eq!((h.len, h.error, h.unique), (36, NOTIFY_INVAL_ENTRY, 0));
        let resend = notification(NOTIFY_RESEND, &[], &[]);
        assert_eq!(resend.len(), 16);
    }
}
