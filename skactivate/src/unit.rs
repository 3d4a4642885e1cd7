//! Finding a socket unit and its drop-ins, and reading its `[Socket]` section.
//!
//! Every file is read through a `root` directory, so that tests (and
//! `skactivate check --root`) can hand over a tree of unit files: paths are
//! kept and shown as systemd sees them inside that root
//! (`/etc/systemd/system/webserver.socket`), and symbolic links are resolved
//! inside the root, never on the host.
//!
//! The rules are systemd's (systemd.unit(5)): the search path in priority
//! order, masking by a link to `/dev/null` or an empty file, aliases by
//! symbolic link, template instances, drop-in directories for the name, the
//! template, every dash prefix and the unit type (`socket.d/`), a drop-in in a
//! higher-priority directory masking the same file name below, drop-ins
//! applied in file-name order after the fragment, and list settings cleared by
//! an empty assignment.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// The system manager's unit search path, highest priority first
/// (systemd's `lookup_paths_init()` for the system scope).
pub const SEARCH_PATH: &[&str] = &[
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
];

/// Unit types systemd knows: a name ending in one of them is a unit name.
const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "target",
    "device",
    "mount",
    "automount",
    "swap",
    "timer",
    "path",
    "slice",
    "scope",
];

/// How many symbolic links one lookup may follow (the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// A unit file, to be read a line at a time.
fn open_file(path: &Path) -> io::Result<Box<dyn io::BufRead>> {
    Ok(Box::new(io::BufReader::with_capacity(
        64 * 1024,
        fs::File::open(path)?,
    )))
}

/// A line of a file, shown as `PATH:LINE`. The path is shared by every
/// location in one file: a unit may have a million lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub path: Arc<Path>,
    /// 1-based; for a continued line, the line where it starts.
    pub line: u32,
}

impl Location {
    pub fn new(path: &Path, line: u32) -> Self {
        Location {
            path: Arc::from(path),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// A setting's value and the line that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub location: Location,
}

impl<T> Located<T> {
    fn at(location: &Location, value: T) -> Self {
        Located {
            value,
            location: location.clone(),
        }
    }
}

/// The `X-SkLookup=` values of a unit, each with its line, in the order
/// written. A unit may carry a million: their text lies in one buffer and
/// each value takes 16 bytes beside it (as a `Located<String>` it took 48
/// and an allocation of its own: 1M values in a drop-in were 75 MB of the
/// daemon's heap, now 40).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    text: String,
    /// Per value: where its text ends in `text`, its line, and its file
    /// (an index into `files`).
    values: Vec<(usize, u32, u32)>,
    files: Vec<Arc<Path>>,
}

impl Values {
    pub fn push(&mut self, location: &Location, value: &str) {
        let same = self
            .files
            .last()
            .is_some_and(|f| Arc::ptr_eq(f, &location.path) || *f == location.path);
        if !same {
            self.files.push(location.path.clone());
        }
        let file = u32::try_from(self.files.len() - 1).unwrap_or(u32::MAX);
        self.text.push_str(value);
        self.values.push((self.text.len(), location.line, file));
    }

    /// Forgets every value (an empty `X-SkLookup=`).
    pub fn clear(&mut self) {
        self.text.clear();
        self.values.clear();
        self.files.clear();
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `index`th value.
    pub fn get(&self, index: usize) -> Option<Located<&str>> {
        let &(end, line, file) = self.values.get(index)?;
        let start = index.checked_sub(1).map_or(0, |i| self.values[i].0);
        Some(Located {
            value: &self.text[start..end],
            location: Location {
                path: self.files[file as usize].clone(),
                line,
            },
        })
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Located<&str>> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// Frees the room that growing while reading left unused.
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.values.shrink_to_fit();
    }
}

/// The `Listen…=` settings of a socket unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenKind {
    Stream,
    Datagram,
    SequentialPacket,
    Fifo,
    Special,
    Netlink,
    MessageQueue,
    UsbFunction,
}

impl ListenKind {
    const ALL: [ListenKind; 8] = [
        ListenKind::Stream,
        ListenKind::Datagram,
        ListenKind::SequentialPacket,
        ListenKind::Fifo,
        ListenKind::Special,
        ListenKind::Netlink,
        ListenKind::MessageQueue,
        ListenKind::UsbFunction,
    ];

    /// The setting's name, `ListenStream` and so on.
    pub fn key(self) -> &'static str {
        match self {
            ListenKind::Stream => "ListenStream",
            ListenKind::Datagram => "ListenDatagram",
            ListenKind::SequentialPacket => "ListenSequentialPacket",
            ListenKind::Fifo => "ListenFIFO",
            ListenKind::Special => "ListenSpecial",
            ListenKind::Netlink => "ListenNetlink",
            ListenKind::MessageQueue => "ListenMessageQueue",
            ListenKind::UsbFunction => "ListenUSBFunction",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.key() == key)
    }
}

/// One `Listen…=` line, unparsed (see [`crate::config::listen_sockets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub kind: ListenKind,
    pub address: String,
    pub location: Location,
}

/// `BindIPv6Only=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindIpv6Only {
    /// Not set: the kernel's default, dual-stack here.
    #[default]
    Default,
    Both,
    Ipv6Only,
}

/// `SocketProtocol=`: sockets that are not plain TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProtocol {
    UdpLite,
    Sctp,
    Mptcp,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// Something wrong in a unit file that does not stop the unit from loading
/// (systemd ignores such lines), or does (a broken section header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileIssueKind {
    #[error("invalid section header {text:?}")]
    SectionHeader { text: String },
    #[error("{text:?}: missing \"=\", line ignored")]
    MissingEquals { text: String },
    #[error("{key}= outside of a section, ignored")]
    OutsideSection { key: String },
    #[error("{key}= is read only in [{expected}], not in [{section}]: ignored")]
    NotInSocket {
        key: String,
        section: String,
        /// `Socket`, or `Service` for a service unit.
        expected: &'static str,
    },
    #[error("{key}= is ignored: the setting is spelled X-SkLookup=")]
    Misspelled { key: String },
    #[error("{key}={value}: not a boolean, ignored")]
    NotBoolean { key: &'static str, value: String },
    #[error("BindIPv6Only={value}: expected default, both, ipv6-only or a boolean; ignored")]
    BindIpv6Only { value: String },
    #[error("SocketProtocol={value}: expected udplite, sctp or mptcp; ignored")]
    SocketProtocol { value: String },
}

impl FileIssueKind {
    pub fn severity(&self) -> Severity {
        match self {
            FileIssueKind::SectionHeader { .. } => Severity::Error,
            _ => Severity::Warning,
        }
    }
}

/// A [`FileIssueKind`] at its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct FileIssue {
    pub location: Location,
    pub kind: FileIssueKind,
}

/// Why a unit could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("invalid unit name")]
    InvalidName,
    #[error("not a socket unit")]
    NotSocket,
    #[error("not a socket or service unit")]
    NotSocketOrService,
    #[error("is a template: name an instance, such as {example}")]
    Template { example: String },
    #[error("not found in the unit search path")]
    NotFound,
    #[error("unit is masked: {} links to /dev/null", .path.display())]
    MaskedByLink { path: PathBuf },
    #[error("unit is masked: {} is empty", .path.display())]
    MaskedByEmptyFile { path: PathBuf },
    #[error("{}: too many levels of symbolic links", .path.display())]
    SymlinkLoop { path: PathBuf },
    /// The I/O error is shown, not chained: said once.
    #[error("cannot read {}: {error}", .path.display())]
    Read { path: PathBuf, error: io::Error },
}

/// A socket unit as its files describe it: where it came from and the
/// `[Socket]` settings skactivate cares about, with list semantics applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketUnit {
    /// The name it was asked for (`webserver.socket`, `dns@eth0.socket`).
    pub name: String,
    /// The unit's own name: `name`, or the name it is an alias of.
    pub id: String,
    /// Every name of the unit: `name`, then the names it is an alias of or
    /// that are aliases of it. Drop-ins were looked up for all of them.
    pub names: Vec<String>,
    /// The unit file.
    pub fragment: PathBuf,
    /// The drop-ins, in the order they apply.
    pub dropins: Vec<PathBuf>,
    /// The `X-SkLookup=` lines in force, one entry per line (an empty
    /// assignment has cleared those before it).
    pub sklookup: Values,
    /// The `Listen…=` lines in force.
    pub listens: Vec<Listen>,
    pub accept: Option<Located<bool>>,
    pub bind_ipv6_only: Option<Located<BindIpv6Only>>,
    pub reuse_port: Option<Located<bool>>,
    pub pass_packet_info: Option<Located<bool>>,
    /// `FreeBind=`: over IPv6 a UDP socket answers from an address no
    /// interface carries (a prefix reached through a local route) only so.
    pub free_bind: Option<Located<bool>>,
    pub file_descriptor_name: Option<Located<String>>,
    pub socket_protocol: Option<Located<SocketProtocol>>,
    /// Lines systemd would ignore or refuse.
    pub issues: Vec<FileIssue>,
    /// The section `X-SkLookup=` is read from: `Socket`, or `Service` for a
    /// service unit (a daemon that binds its own sockets, registered with
    /// `register-pid`); in a service unit nothing else is read.
    pub section: &'static str,
}

impl SocketUnit {
    /// Finds `name` (`webserver.socket`, or `webserver`: `.socket` is
    /// implied) in the search path under `root` and reads it with its
    /// drop-ins.
    pub fn find(root: &Path, name: &str) -> Result<SocketUnit, UnitError> {
        let name = sklookup_unit_name(name)?;
        let tree = Tree::new(root);
        let mut names = vec![name.clone()];
        let fragment = tree.find_fragment(&name, &mut names)?;
        let id = names.last().cloned().unwrap_or_else(|| name.clone());
        tree.add_reverse_aliases(&mut names)?;
        let dropins = tree.dropins(&names)?;
        let mut unit = SocketUnit::empty(name, id, names, fragment, dropins);
        unit.read_all(|path| tree.open(path))?;
        Ok(unit)
    }

    /// Reads the template `name` (`dns@.socket`, `api@.service`) with the
    /// drop-ins every one of its instances shares (the template's, its dash
    /// prefixes', the unit type's): what an instance with no drop-ins of its
    /// own is made of. Values may hold specifiers such as `%i`, which only an
    /// instance resolves; the generator needs nothing but whether
    /// `X-SkLookup=` is in force.
    pub fn find_template(root: &Path, name: &str) -> Result<SocketUnit, UnitError> {
        let parsed = UnitName::parse(name).ok_or(UnitError::InvalidName)?;
        if !parsed.is_template() {
            return Err(UnitError::InvalidName);
        }
        if section_of(parsed.suffix).is_none() {
            return Err(UnitError::NotSocketOrService);
        }
        let tree = Tree::new(root);
        let mut names = vec![name.to_owned()];
        let fragment = tree.find_fragment(name, &mut names)?;
        let id = names.last().cloned().unwrap_or_else(|| name.to_owned());
        let dropins = tree.dropins(&names)?;
        let mut unit = SocketUnit::empty(name.to_owned(), id, names, fragment, dropins);
        unit.read_all(|path| tree.open(path))?;
        Ok(unit)
    }

    /// Reads `file` (a path on the host, shown as given) as the unit file of
    /// the unit its name says, with the drop-ins the search path under
    /// `root` has for that name.
    pub fn from_file(root: &Path, file: &Path) -> Result<SocketUnit, UnitError> {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(UnitError::InvalidName)?;
        let parsed = UnitName::parse(name).ok_or(UnitError::InvalidName)?;
        if section_of(parsed.suffix).is_none() {
            return Err(UnitError::NotSocketOrService);
        }
        let tree = Tree::new(root);
        let names = vec![name.to_owned()];
        let dropins = tree.dropins(&names)?;
        let mut unit = SocketUnit::empty(
            name.to_owned(),
            name.to_owned(),
            names,
            file.to_owned(),
            dropins,
        );
        let fragment = file.to_owned();
        unit.read_all(|path| {
            if path == fragment {
                open_file(path).map_err(|source| UnitError::Read {
                    path: path.to_owned(),
                    error: source,
                })
            } else {
                tree.open(path)
            }
        })?;
        Ok(unit)
    }

    /// Reads an explicit list of files, as systemd's `FragmentPath` and
    /// `DropInPaths` properties give them, in that order.
    pub fn from_paths(
        root: &Path,
        name: &str,
        fragment: &Path,
        dropins: &[PathBuf],
    ) -> Result<SocketUnit, UnitError> {
        let name = sklookup_unit_name(name)?;
        let tree = Tree::new(root);
        let mut unit = SocketUnit::empty(
            name.clone(),
            name.clone(),
            vec![name],
            fragment.to_owned(),
            dropins.to_vec(),
        );
        unit.read_all(|path| tree.open(path))?;
        Ok(unit)
    }

    /// A unit made of `X-SkLookup=` values alone, read from no file (for
    /// `register --sklookup`, and for tests): the locations say where each
    /// value came from.
    pub fn inline(name: &str, sklookup: Values) -> SocketUnit {
        let mut unit = SocketUnit::empty(
            name.to_owned(),
            name.to_owned(),
            vec![name.to_owned()],
            PathBuf::new(),
            Vec::new(),
        );
        unit.sklookup = sklookup;
        unit
    }

    /// A unit made of `--sklookup` values alone; problems point at
    /// `--sklookup:N`, the Nth value given.
    pub fn from_sklookup_options(name: &str, values: &[String]) -> SocketUnit {
        let path: Arc<Path> = Arc::from(Path::new("--sklookup"));
        let mut located = Values::default();
        for (i, v) in values.iter().enumerate() {
            let location = Location {
                path: path.clone(),
                line: u32::try_from(i + 1).unwrap_or(u32::MAX),
            };
            located.push(&location, v);
        }
        SocketUnit::inline(name, located)
    }

    /// The fragment, then the drop-ins.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.fragment.as_path()).chain(self.dropins.iter().map(PathBuf::as_path))
    }

    pub fn accept(&self) -> bool {
        self.accept.as_ref().is_some_and(|a| a.value)
    }

    pub fn bind_ipv6_only(&self) -> BindIpv6Only {
        self.bind_ipv6_only
            .as_ref()
            .map_or(BindIpv6Only::Default, |b| b.value)
    }

    pub fn reuse_port(&self) -> bool {
        self.reuse_port.as_ref().is_some_and(|a| a.value)
    }

    pub fn pass_packet_info(&self) -> bool {
        self.pass_packet_info.as_ref().is_some_and(|a| a.value)
    }

    pub fn free_bind(&self) -> bool {
        self.free_bind.as_ref().is_some_and(|a| a.value)
    }

    fn empty(
        name: String,
        id: String,
        names: Vec<String>,
        fragment: PathBuf,
        dropins: Vec<PathBuf>,
    ) -> Self {
        let section = name
            .rsplit_once('.')
            .and_then(|(_, suffix)| section_of(suffix))
            .unwrap_or("Socket");
        SocketUnit {
            section,
            name,
            id,
            names,
            fragment,
            dropins,
            sklookup: Values::default(),
            listens: Vec::new(),
            accept: None,
            bind_ipv6_only: None,
            reuse_port: None,
            pass_packet_info: None,
            free_bind: None,
            file_descriptor_name: None,
            socket_protocol: None,
            issues: Vec::new(),
        }
    }

    /// Reads the fragment, then the drop-ins, `open` giving each file's
    /// bytes. A file is read a line at a time, never held whole: a drop-in
    /// of a million bindings is some 40 MB.
    fn read_all(
        &mut self,
        mut open: impl FnMut(&Path) -> Result<Box<dyn io::BufRead>, UnitError>,
    ) -> Result<(), UnitError> {
        let files: Vec<PathBuf> = self.files().map(Path::to_path_buf).collect();
        for path in files {
            let read_error = |error| UnitError::Read {
                path: path.clone(),
                error,
            };
            let mut input = open(&path)?;
            if path == self.fragment && input.fill_buf().map_err(read_error)?.is_empty() {
                return Err(UnitError::MaskedByEmptyFile { path });
            }
            self.parse(&path, input).map_err(read_error)?;
        }
        self.sklookup.shrink_to_fit();
        Ok(())
    }

    /// systemd's `config_parse()`: comments, sections, `KEY=VALUE` with
    /// whitespace around `=`, and lines continued by a trailing backslash
    /// (comment lines inside a continuation are skipped). A continued line
    /// counts as the line where it starts. Bytes that are not UTF-8 read as
    /// U+FFFD.
    fn parse(&mut self, path: &Path, mut input: impl io::BufRead) -> io::Result<()> {
        let path: Arc<Path> = Arc::from(path);
        let line_number = |start: usize| u32::try_from(start).unwrap_or(u32::MAX);
        let mut section: Option<String> = None;
        let mut continued: Option<(String, usize)> = None;
        let mut bytes = Vec::new();
        for index in 0.. {
            bytes.clear();
            if input.read_until(b'\n', &mut bytes)? == 0 {
                break;
            }
            let mut raw = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            if index == 0 {
                raw = raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw);
            }
            let raw = String::from_utf8_lossy(raw);
            let raw = raw.strip_suffix('\r').unwrap_or(&raw);
            if raw.trim_start_matches(WHITESPACE).starts_with(['#', ';']) {
                continue;
            }
            let (mut line, start) = match continued.take() {
                Some((mut so_far, start)) => {
                    so_far.push_str(raw);
                    (so_far, start)
                }
                None => (raw.to_owned(), index + 1),
            };
            if ends_in_backslash(&line) {
                line.pop();
                line.push(' ');
                continued = Some((line, start));
                continue;
            }
            let location = Location {
                path: path.clone(),
                line: line_number(start),
            };
            if !self.parse_line(location, &line, &mut section) {
                return Ok(());
            }
        }
        if let Some((line, start)) = continued {
            let location = Location {
                path,
                line: line_number(start),
            };
            self.parse_line(location, &line, &mut section);
        }
        Ok(())
    }

    /// One logical line. Returns false when the rest of the file is not
    /// read (systemd refuses a file with a broken section header).
    fn parse_line(&mut self, location: Location, line: &str, section: &mut Option<String>) -> bool {
        let line = line.trim_matches(WHITESPACE);
        if line.is_empty() {
            return true;
        }
        if line.starts_with('[') {
            if line.len() < 2 || !line.ends_with(']') {
                self.issue(
                    location,
                    FileIssueKind::SectionHeader {
                        text: line.to_owned(),
                    },
                );
                return false;
            }
            *section = Some(line[1..line.len() - 1].to_owned());
            return true;
        }
        let Some((key, value)) = line.split_once('=') else {
            if section.as_deref() == Some(self.section) {
                self.issue(
                    location,
                    FileIssueKind::MissingEquals {
                        text: line.to_owned(),
                    },
                );
            }
            return true;
        };
        let (key, value) = (key.trim_matches(WHITESPACE), value.trim_matches(WHITESPACE));
        let sklookup_like = key.eq_ignore_ascii_case("X-SkLookup");
        match section.as_deref() {
            Some(s) if s == self.section => {}
            Some(other) => {
                if sklookup_like {
                    let kind = FileIssueKind::NotInSocket {
                        key: key.to_owned(),
                        section: other.to_owned(),
                        expected: self.section,
                    };
                    self.issue(location, kind);
                }
                return true;
            }
            None => {
                if sklookup_like {
                    let kind = FileIssueKind::OutsideSection {
                        key: key.to_owned(),
                    };
                    self.issue(location, kind);
                }
                return true;
            }
        }
        if self.section != "Socket" && !sklookup_like {
            // A service's own settings are systemd's business.
            return true;
        }
        match key {
            "X-SkLookup" if value.is_empty() => self.sklookup.clear(),
            // Specifiers as systemd would expand them in a unit file
            // (`X-SkLookup=192.0.2.0/24:%i` in `dns@.socket`): `%i`, `%I`,
            // `%n`, `%N`, `%p`, `%P`, `%%`.
            "X-SkLookup" => {
                let value = crate::config::expand_specifiers(value, &self.name);
                self.sklookup.push(&location, &value);
            }
            "Accept" => self.set_boolean(&location, "Accept", value, |u| &mut u.accept),
            "ReusePort" => self.set_boolean(&location, "ReusePort", value, |u| &mut u.reuse_port),
            "PassPacketInfo" => {
                self.set_boolean(&location, "PassPacketInfo", value, |u| {
                    &mut u.pass_packet_info
                });
            }
            "FreeBind" => self.set_boolean(&location, "FreeBind", value, |u| &mut u.free_bind),
            "BindIPv6Only" => match parse_bind_ipv6_only(value) {
                Some(b) => self.bind_ipv6_only = Some(Located::at(&location, b)),
                None => self.issue(
                    location.clone(),
                    FileIssueKind::BindIpv6Only {
                        value: value.to_owned(),
                    },
                ),
            },
            "SocketProtocol" => match value {
                "" => self.socket_protocol = None,
                "udplite" => {
                    self.socket_protocol = Some(Located::at(&location, SocketProtocol::UdpLite))
                }
                "sctp" => self.socket_protocol = Some(Located::at(&location, SocketProtocol::Sctp)),
                "mptcp" => {
                    self.socket_protocol = Some(Located::at(&location, SocketProtocol::Mptcp))
                }
                _ => self.issue(
                    location.clone(),
                    FileIssueKind::SocketProtocol {
                        value: value.to_owned(),
                    },
                ),
            },
            "FileDescriptorName" if value.is_empty() => self.file_descriptor_name = None,
            "FileDescriptorName" => {
                self.file_descriptor_name = Some(Located::at(&location, value.to_owned()))
            }
            _ if sklookup_like => self.issue(
                location.clone(),
                FileIssueKind::Misspelled {
                    key: key.to_owned(),
                },
            ),
            _ => match ListenKind::from_key(key) {
                // systemd frees every Listen…= on any empty one.
                Some(_) if value.is_empty() => self.listens.clear(),
                Some(kind) => self.listens.push(Listen {
                    kind,
                    address: value.to_owned(),
                    location: location.clone(),
                }),
                None => {}
            },
        }
        true
    }

    /// A boolean setting; an invalid value is ignored, as systemd does, and
    /// the previous one stays.
    fn set_boolean(
        &mut self,
        location: &Location,
        key: &'static str,
        value: &str,
        field: fn(&mut Self) -> &mut Option<Located<bool>>,
    ) {
        match parse_boolean(value) {
            Some(b) => *field(self) = Some(Located::at(location, b)),
            None => self.issue(
                location.clone(),
                FileIssueKind::NotBoolean {
                    key,
                    value: value.to_owned(),
                },
            ),
        }
    }

    fn issue(&mut self, location: Location, kind: FileIssueKind) {
        self.issues.push(FileIssue { location, kind });
    }
}

/// systemd's `WHITESPACE`.
const WHITESPACE: &[char] = &[' ', '\t', '\n', '\r'];

/// Whether the line ends in a backslash that is not itself escaped.
fn ends_in_backslash(line: &str) -> bool {
    let trailing = line.bytes().rev().take_while(|&b| b == b'\\').count();
    trailing % 2 == 1
}

/// systemd's `parse_boolean()`.
pub fn parse_boolean(value: &str) -> Option<bool> {
    const YES: &[&str] = &["1", "yes", "y", "true", "t", "on"];
    const NO: &[&str] = &["0", "no", "n", "false", "f", "off"];
    if YES.iter().any(|y| value.eq_ignore_ascii_case(y)) {
        Some(true)
    } else if NO.iter().any(|n| value.eq_ignore_ascii_case(n)) {
        Some(false)
    } else {
        None
    }
}

fn parse_bind_ipv6_only(value: &str) -> Option<BindIpv6Only> {
    match value {
        "default" => Some(BindIpv6Only::Default),
        "both" => Some(BindIpv6Only::Both),
        "ipv6-only" => Some(BindIpv6Only::Ipv6Only),
        _ => parse_boolean(value).map(|b| {
            if b {
                BindIpv6Only::Ipv6Only
            } else {
                BindIpv6Only::Both
            }
        }),
    }
}

/// A unit name taken apart: `prefix@instance.suffix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UnitName<'a> {
    prefix: &'a str,
    /// `Some("")` for a template.
    instance: Option<&'a str>,
    suffix: &'a str,
}

impl<'a> UnitName<'a> {
    /// systemd's `unit_name_is_valid()`.
    fn parse(name: &'a str) -> Option<Self> {
        if name.len() > 255 {
            return None;
        }
        let (stem, suffix) = name.rsplit_once('.')?;
        if !UNIT_TYPES.contains(&suffix) {
            return None;
        }
        let (prefix, instance) = match stem.split_once('@') {
            Some((p, i)) => (p, Some(i)),
            None => (stem, None),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || ":-_.\\".contains(c);
        if prefix.is_empty() || !prefix.chars().all(valid) {
            return None;
        }
        if let Some(i) = instance
            && !i.chars().all(|c| valid(c) || c == '@')
        {
            return None;
        }
        Some(UnitName {
            prefix,
            instance,
            suffix,
        })
    }

    fn is_instance(self) -> bool {
        self.instance.is_some_and(|i| !i.is_empty())
    }

    fn is_template(self) -> bool {
        self.instance == Some("")
    }

    fn template(self) -> String {
        format!("{}@.{}", self.prefix, self.suffix)
    }
}

/// The full name of a socket unit: `.socket` is implied when the name has no unit
/// type (as `systemctl` implies `.service`).
pub fn socket_unit_name(name: &str) -> Result<String, UnitError> {
    let full = match UnitName::parse(name) {
        Some(_) => name.to_owned(),
        None => format!("{name}.socket"),
    };
    let parsed = UnitName::parse(&full).ok_or(UnitError::InvalidName)?;
    if parsed.suffix != "socket" {
        return Err(UnitError::NotSocket);
    }
    if parsed.is_template() {
        return Err(UnitError::Template {
            example: format!("{}@NAME.{}", parsed.prefix, parsed.suffix),
        });
    }
    Ok(full)
}

/// The section a unit type's `X-SkLookup=` lives in, if it may have one.
fn section_of(suffix: &str) -> Option<&'static str> {
    match suffix {
        "socket" => Some("Socket"),
        "service" => Some("Service"),
        _ => None,
    }
}

/// The full name of a unit that may carry `X-SkLookup=`: a socket unit
/// (`.socket` implied without a type, as [`socket_unit_name`] does) or a
/// service unit (`nginx.service`, for `register-pid`).
pub fn sklookup_unit_name(name: &str) -> Result<String, UnitError> {
    match UnitName::parse(name) {
        Some(parsed) if parsed.suffix == "service" => {
            if parsed.is_template() {
                return Err(UnitError::Template {
                    example: format!("{}@NAME.{}", parsed.prefix, parsed.suffix),
                });
            }
            Ok(name.to_owned())
        }
        Some(parsed) if parsed.suffix != "socket" => Err(UnitError::NotSocketOrService),
        _ => socket_unit_name(name),
    }
}

/// The names whose `NAME.d/` directories hold drop-ins for `name`, in
/// systemd's order (`unit_file_find_dirs()`): the name, its template, then the
/// same for every dash prefix (`foo-bar-baz.socket` → `foo-bar-.socket`,
/// `foo-.socket`).
fn dropin_names(name: &str, out: &mut Vec<String>) {
    out.push(name.to_owned());
    let Some(parsed) = UnitName::parse(name) else {
        return;
    };
    if parsed.is_instance() {
        dropin_names(&parsed.template(), out);
    }
    let prefix = parsed.prefix;
    let mut cut = prefix;
    let mut chopped = false;
    let shorter = loop {
        let Some(dash) = cut.rfind('-') else {
            return;
        };
        if dash == 0 {
            return;
        }
        if dash + 1 < cut.len() || chopped {
            break &cut[..=dash];
        }
        // A trailing dash: chop it off and look again, once.
        cut = &cut[..dash];
        chopped = true;
    };
    // A template's prefix name is a plain name: `foo-bar@.socket` → `foo-.socket`.
    let shorter = match parsed.instance {
        Some(i) if !i.is_empty() => format!("{shorter}@{i}.{}", parsed.suffix),
        _ => format!("{shorter}.{}", parsed.suffix),
    };
    dropin_names(&shorter, out);
}

/// Where a path leads.
enum Target {
    /// A link (or chain of links) to `/dev/null`.
    DevNull,
    /// Nothing there, or a dangling link.
    Missing,
    /// A file or directory at this symlink-free path.
    Found { path: PathBuf, meta: fs::Metadata },
}

/// A directory tree seen as a root file system: paths inside it are
/// absolute, symbolic links are resolved against it.
struct Tree<'a> {
    root: &'a Path,
}

impl<'a> Tree<'a> {
    fn new(root: &'a Path) -> Self {
        Tree { root }
    }

    /// The host path of an absolute path inside the tree.
    fn host(&self, path: &Path) -> PathBuf {
        let relative: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(relative)
    }

    fn open(&self, path: &Path) -> Result<Box<dyn io::BufRead>, UnitError> {
        let read_error = |source| UnitError::Read {
            path: path.to_owned(),
            error: source,
        };
        match self.follow(path)? {
            (_, Target::Found { path: found, .. }) => {
                open_file(&self.host(&found)).map_err(read_error)
            }
            (_, Target::DevNull) => Ok(Box::new(io::empty())),
            (_, Target::Missing) => Err(read_error(io::ErrorKind::NotFound.into())),
        }
    }

    /// Follows `path` to what it leads to; also returns the links on the
    /// way at its last component (for aliases).
    fn follow(&self, path: &Path) -> Result<(Vec<PathBuf>, Target), UnitError> {
        let mut links = Vec::new();
        let mut current = normalize(path);
        for _ in 0..MAX_LINKS {
            if current == Path::new("/dev/null") {
                return Ok((links, Target::DevNull));
            }
            let (Some(parent), Some(name)) = (current.parent(), current.file_name()) else {
                let meta = self.metadata(&current)?;
                return Ok((
                    links,
                    meta.map_or(Target::Missing, |meta| Target::Found {
                        path: current,
                        meta,
                    }),
                ));
            };
            let Some(dir) = self.directory(parent)? else {
                return Ok((links, Target::Missing));
            };
            let here = dir.join(name);
            if here == Path::new("/dev/null") {
                return Ok((links, Target::DevNull));
            }
            let Some(meta) = self.metadata(&here)? else {
                return Ok((links, Target::Missing));
            };
            if !meta.is_symlink() {
                return Ok((links, Target::Found { path: here, meta }));
            }
            let target = fs::read_link(self.host(&here)).map_err(|source| UnitError::Read {
                path: here.clone(),
                error: source,
            })?;
            links.push(here);
            current = normalize(&dir.join(target));
        }
        Err(UnitError::SymlinkLoop {
            path: path.to_owned(),
        })
    }

    /// The symlink-free path of a directory, if there is one.
    fn directory(&self, path: &Path) -> Result<Option<PathBuf>, UnitError> {
        let mut resolved = PathBuf::from("/");
        for component in path.components() {
            let Component::Normal(name) = component else {
                continue;
            };
            match self.follow(&resolved.join(name))? {
                (_, Target::Found { path, meta }) if meta.is_dir() => resolved = path,
                _ => return Ok(None),
            }
        }
        Ok(Some(resolved))
    }

    fn metadata(&self, path: &Path) -> Result<Option<fs::Metadata>, UnitError> {
        match fs::symlink_metadata(self.host(path)) {
            Ok(meta) => Ok(Some(meta)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(UnitError::Read {
                path: path.to_owned(),
                error: source,
            }),
        }
    }

    /// The search path's directories that exist, each with its
    /// symlink-free path (`/lib` may be a link to `/usr/lib`).
    fn search_dirs(&self) -> Result<Vec<(PathBuf, PathBuf)>, UnitError> {
        let mut dirs = Vec::new();
        for dir in SEARCH_PATH {
            if let Some(real) = self.directory(Path::new(dir))? {
                dirs.push((PathBuf::from(dir), real));
            }
        }
        Ok(dirs)
    }

    /// The unit file for `name`: the first search directory with an entry
    /// wins; an instance without its own file uses its template's. Aliases
    /// found on the way are added to `names`.
    fn find_fragment(&self, name: &str, names: &mut Vec<String>) -> Result<PathBuf, UnitError> {
        let dirs = self.search_dirs()?;
        let mut name = name.to_owned();
        for _ in 0..MAX_LINKS {
            let parsed = UnitName::parse(&name).ok_or(UnitError::InvalidName)?;
            let found = match self.entry(&dirs, &name)? {
                Some(found) => Some(found),
                None if parsed.is_instance() => self.entry(&dirs, &parsed.template())?,
                None => None,
            };
            let Some((path, alias)) = found else {
                return Err(UnitError::NotFound);
            };
            let Some(alias) = alias else {
                return Ok(path);
            };
            // An alias: the unit is the one the link names, wherever the
            // search path finds it.
            let target = UnitName::parse(&alias).ok_or(UnitError::InvalidName)?;
            let alias = match (target.is_template(), parsed.instance) {
                (true, Some(instance)) if !instance.is_empty() => {
                    format!("{}@{instance}.{}", target.prefix, target.suffix)
                }
                _ => alias,
            };
            if !names.contains(&alias) {
                names.push(alias.clone());
            }
            name = alias;
        }
        Err(UnitError::SymlinkLoop {
            path: PathBuf::from(name),
        })
    }

    /// The entry for `name` in the highest-priority search directory that
    /// has one: the file, or the name it is an alias of.
    fn entry(
        &self,
        dirs: &[(PathBuf, PathBuf)],
        name: &str,
    ) -> Result<Option<(PathBuf, Option<String>)>, UnitError> {
        for (dir, _) in dirs {
            let path = dir.join(name);
            let (links, target) = self.follow(&path)?;
            match target {
                Target::Missing => continue,
                Target::DevNull => {
                    return Err(UnitError::MaskedByLink {
                        path: links.into_iter().next().unwrap_or(path),
                    });
                }
                Target::Found { meta, .. } if !meta.is_file() => continue,
                Target::Found { path: file, meta } => {
                    if !links.is_empty()
                        && let Some(alias) = self.alias_name(dirs, name, &file)
                    {
                        return Ok(Some((file, Some(alias))));
                    }
                    // A linked unit file is shown where the link leads, a
                    // plain one where the search path found it.
                    let shown = if links.is_empty() { path } else { file };
                    if meta.len() == 0 {
                        return Err(UnitError::MaskedByEmptyFile { path: shown });
                    }
                    return Ok(Some((shown, None)));
                }
            }
        }
        Ok(None)
    }

    /// When a link named `name` leads to `file` in a search directory under
    /// another unit name, that name: `name` is an alias of it. A link to a
    /// file of the same name, or to the template of the instance `name`, or
    /// to a file outside the search path, is not an alias.
    fn alias_name(&self, dirs: &[(PathBuf, PathBuf)], name: &str, file: &Path) -> Option<String> {
        let parent = file.parent()?;
        if !dirs.iter().any(|(_, real)| real == parent) {
            return None;
        }
        let target = file.file_name()?.to_str()?;
        let parsed = UnitName::parse(name)?;
        if target == name || (parsed.is_instance() && target == parsed.template()) {
            return None;
        }
        UnitName::parse(target).filter(|t| t.suffix == parsed.suffix)?;
        Some(target.to_owned())
    }

    /// Adds to `names` every link in the search path that is an alias of
    /// one of them (systemd loads the drop-ins of every name of a unit).
    fn add_reverse_aliases(&self, names: &mut Vec<String>) -> Result<(), UnitError> {
        let dirs = self.search_dirs()?;
        let mut seen = HashSet::new();
        let mut aliases = Vec::new();
        for (dir, real) in &dirs {
            for entry in self.list(real)? {
                if !seen.insert(entry.clone()) || !entry.ends_with(".socket") {
                    continue;
                }
                let (links, target) = self.follow(&dir.join(&entry))?;
                if links.is_empty() {
                    continue;
                }
                if let Target::Found { path, .. } = target
                    && let Some(alias) = self.alias_name(&dirs, &entry, &path)
                    && names.contains(&alias)
                    && !names.contains(&entry)
                {
                    aliases.push(entry);
                }
            }
        }
        names.extend(aliases);
        Ok(())
    }

    /// The file names in a directory (not starting with a dot), sorted.
    fn list(&self, dir: &Path) -> Result<Vec<String>, UnitError> {
        let entries = match fs::read_dir(self.host(dir)) {
            Ok(entries) => entries,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(Vec::new());
            }
            Err(source) => {
                return Err(UnitError::Read {
                    path: dir.to_owned(),
                    error: source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| UnitError::Read {
                path: dir.to_owned(),
                error: source,
            })?;
            if let Ok(name) = entry.file_name().into_string()
                && !name.starts_with('.')
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The drop-ins for a unit of these names: `*.conf` in every drop-in
    /// directory of every name in every search directory, then in the
    /// type's `socket.d/`. The first directory to have a file name wins (a
    /// link to `/dev/null` or an empty file masks it); they apply in
    /// file-name order.
    fn dropins(&self, names: &[String]) -> Result<Vec<PathBuf>, UnitError> {
        let dirs = self.search_dirs()?;
        // Name by name (the unit's own first, then its aliases), directory by
        // directory, then the name's template and dash prefixes: the order
        // of systemd's unit_file_find_dropin_paths().
        let mut dropin_dirs = Vec::new();
        for name in names {
            let mut candidates = Vec::new();
            dropin_names(name, &mut candidates);
            for (dir, _) in &dirs {
                for candidate in &candidates {
                    dropin_dirs.push(dir.join(format!("{candidate}.d")));
                }
            }
        }
        let suffix = names
            .first()
            .and_then(|n| UnitName::parse(n))
            .map_or("socket", |n| n.suffix);
        for (dir, _) in &dirs {
            dropin_dirs.push(dir.join(format!("{suffix}.d")));
        }

        let mut files: BTreeMap<String, Option<PathBuf>> = BTreeMap::new();
        for dropin_dir in dropin_dirs {
            let Some(real) = self.directory(&dropin_dir)? else {
                continue;
            };
            for file in self.list(&real)? {
                if !file.ends_with(".conf") || files.contains_key(&file) {
                    continue;
                }
                let path = dropin_dir.join(&file);
                match self.follow(&path)?.1 {
                    Target::DevNull => {
                        files.insert(file, None);
                    }
                    Target::Found { meta, .. } if meta.is_file() => {
                        let used = (meta.len() > 0).then_some(path);
                        files.insert(file, used);
                    }
                    Target::Found { .. } | Target::Missing => {}
                }
            }
        }
        Ok(files.into_values().flatten().collect())
    }
}

/// An absolute path without `.` and `..` (which cannot leave the root).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> SocketUnit {
        let mut unit = SocketUnit::empty(
            "t.socket".into(),
            "t.socket".into(),
            vec!["t.socket".into()],
            "/t.socket".into(),
            Vec::new(),
        );
        unit.parse(Path::new("/t.socket"), text.as_bytes()).unwrap();
        unit
    }

    fn sklookup(unit: &SocketUnit) -> Vec<(u32, &str)> {
        unit.sklookup
            .iter()
            .map(|e| (e.location.line, e.value))
            .collect()
    }

    #[test]
    fn continuation_comments_and_clearing() {
        let unit = parsed(
            "[Socket]\n\
             # X-SkLookup=1.1.1.1\n\
             ; X-SkLookup=2.2.2.2\n\
             X-SkLookup = 192.0.2.0/24:80 \\\n\
             # a comment inside is skipped\n\
             \x20 198.51.100.0/24:80\n\
             X-SkLookup=\n\
             X-SkLookup=203.0.113.1 \\\\\n\
             X-SkLookup=203.0.113.2\\\n",
        );
        assert_eq!(
            sklookup(&unit),
            [(8, "203.0.113.1 \\\\"), (9, "203.0.113.2")]
        );
        let unit = parsed("[Socket]\nX-SkLookup=192.0.2.0/24:80 \\\n  198.51.100.0/24:80\n");
        assert_eq!(
            sklookup(&unit),
            [(2, "192.0.2.0/24:80    198.51.100.0/24:80")]
        );
    }

    /// A file read a line at a time reads as it did whole: a byte order
    /// mark, CRLF line ends, bytes that are not UTF-8, a continuation at the
    /// end of a file without a last newline.
    #[test]
    fn lines_read_one_at_a_time() {
        let mut unit = parsed("");
        unit.parse(
            Path::new("/t.socket"),
            &b"\xef\xbb\xbf[Socket]\r\nX-SkLookup=192.0.2.1\r\nX-SkLookup=\xff192.0.2.2\nX-SkLookup=192.0.2.3 \\"[..],
        )
        .unwrap();
        assert_eq!(
            sklookup(&unit),
            [(2, "192.0.2.1"), (3, "\u{fffd}192.0.2.2"), (4, "192.0.2.3")]
        );
    }

    /// Values from several files keep each its file and line; an empty
    /// assignment forgets all before it.
    #[test]
    fn values_keep_their_files() {
        let a = Location::new(Path::new("/a.socket"), 3);
        let b = Location::new(Path::new("/a.socket.d/b.conf"), 1);
        let mut values = Values::default();
        values.push(&a, "192.0.2.1");
        values.push(&b, "");
        values.push(&b, "192.0.2.3 192.0.2.4");
        let got: Vec<String> = values
            .iter()
            .map(|l| format!("{}: {}", l.location, l.value))
            .collect();
        assert_eq!(
            got,
            [
                "/a.socket:3: 192.0.2.1",
                "/a.socket.d/b.conf:1: ",
                "/a.socket.d/b.conf:1: 192.0.2.3 192.0.2.4"
            ]
        );
        assert_eq!(values.len(), 3);
        assert!(values.get(3).is_none());
        values.clear();
        assert!(values.is_empty());
        values.push(&b, "192.0.2.5");
        assert_eq!(
            values.get(0).map(|l| (l.location, l.value)),
            Some((b, "192.0.2.5"))
        );
    }

    #[test]
    fn specifiers_expand_with_the_instance() {
        let mut unit = SocketUnit::empty(
            "dns@8053.socket".into(),
            "dns@8053.socket".into(),
            vec!["dns@8053.socket".into()],
            "/dns@.socket".into(),
            Vec::new(),
        );
        unit.parse(
            Path::new("/dns@.socket"),
            "[Socket]\nX-SkLookup=192.0.2.0/24:%i udp:[2001:db8::%%]:53\nX-SkLookup=%x\n"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            sklookup(&unit),
            [(2, "192.0.2.0/24:8053 udp:[2001:db8::%]:53"), (3, "%x")]
        );
    }

    #[test]
    fn only_the_socket_section_counts() {
        let unit = parsed(
            "X-SkLookup=10.0.0.1\n[Unit]\nX-SkLookup=10.0.0.2\n[Socket]\nx-sklookup=10.0.0.3\nX-SkLookup 10.0.0.4\nListenStream=80\nAccept=maybe\n",
        );
        assert!(unit.sklookup.is_empty());
        let issues: Vec<String> = unit.issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            issues,
            [
                "/t.socket:1: X-SkLookup= outside of a section, ignored",
                "/t.socket:3: X-SkLookup= is read only in [Socket], not in [Unit]: ignored",
                "/t.socket:5: x-sklookup= is ignored: the setting is spelled X-SkLookup=",
                "/t.socket:6: \"X-SkLookup 10.0.0.4\": missing \"=\", line ignored",
                "/t.socket:8: Accept=maybe: not a boolean, ignored",
            ]
        );
        assert_eq!(unit.listens.len(), 1);
        assert!(!unit.accept());
    }

    #[test]
    fn broken_section_header_stops_the_file() {
        let unit = parsed("[Socket]\nX-SkLookup=10.0.0.1\n[Socket\nX-SkLookup=10.0.0.2\n");
        assert_eq!(sklookup(&unit), [(2, "10.0.0.1")]);
        assert_eq!(
            unit.issues[0].to_string(),
            "/t.socket:3: invalid section header \"[Socket\""
        );
    }

    #[test]
    fn dropin_directory_names_follow_systemd() {
        let cases: &[(&str, &[&str])] = &[
            ("web.socket", &["web.socket"]),
            (
                "foo-bar-baz.socket",
                &["foo-bar-baz.socket", "foo-bar-.socket", "foo-.socket"],
            ),
            (
                "foo-bar@x.socket",
                &[
                    "foo-bar@x.socket",
                    "foo-bar@.socket",
                    "foo-.socket",
                    "foo-@x.socket",
                    "foo-@.socket",
                ],
            ),
            ("-foo.socket", &["-foo.socket"]),
            ("foo-.socket", &["foo-.socket"]),
        ];
        for (name, expected) in cases {
            let mut out = Vec::new();
            dropin_names(name, &mut out);
            assert_eq!(out, *expected, "{name}");
        }
    }

    #[test]
    fn unit_names() {
        assert_eq!(socket_unit_name("web").ok(), Some("web.socket".to_owned()));
        assert_eq!(
            socket_unit_name("dns@eth0.socket").ok(),
            Some("dns@eth0.socket".to_owned())
        );
        assert!(matches!(
            socket_unit_name("web.service"),
            Err(UnitError::NotSocket)
        ));
        assert!(matches!(
            socket_unit_name("we b"),
            Err(UnitError::InvalidName)
        ));
        assert_eq!(
            socket_unit_name("dns@.socket").map_err(|e| e.to_string()),
            Err("is a template: name an instance, such as dns@NAME.socket".to_owned())
        );
        assert_eq!(parse_boolean("On"), Some(true));
        assert_eq!(parse_boolean("0"), Some(false));
        assert_eq!(parse_boolean(""), None);
    }
}
