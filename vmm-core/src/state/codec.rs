//! The machine-state container (magic, format version, named and versioned sections) and the
//! primitives component bodies are made of. The layout is documented in [`crate::state`].

use serde::de::value::{BytesDeserializer, Error as ValueError};
use serde::ser::Impossible;
use serde::{Deserialize, Serialize, Serializer};

use super::STATE_FORMAT_VERSION;
use crate::VmError;

/// First bytes of an encoded machine state.
pub const MAGIC: [u8; 4] = *b"VMST";
/// Bytes before the first section: magic, format version, section count.
pub const CONTAINER_HEADER_LEN: usize = 12;
/// Most sections one machine state may hold (a machine with the most vCPUs has far fewer).
pub const MAX_SECTIONS: usize = 256;
/// Longest component name.
pub const MAX_NAME_LEN: usize = 32;

/// One section of an encoded machine state, borrowed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    /// Component name.
    pub name: &'a str,
    /// Version of the body's encoding.
    pub version: u32,
    /// The component's body.
    pub body: &'a [u8],
}

fn framing(at: usize, reason: impl Into<String>) -> VmError {
    VmError::StateFraming {
        at,
        reason: reason.into(),
    }
}

/// True for a name a section may carry: 1..=MAX_NAME_LEN bytes of `[a-z0-9_]`.
pub fn valid_name(name: &[u8]) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The sections of an encoded machine state, in file order. Checks the framing only (magic,
/// format version, counts, names, lengths, nothing after the last section); what the sections
/// mean is the components' business.
pub fn read_sections(b: &[u8]) -> Result<Vec<Section<'_>>, VmError> {
    if b.first() == Some(&b'{') {
        return Err(legacy_version(b));
    }
    if b.len() < CONTAINER_HEADER_LEN {
        return Err(framing(
            0,
            format!(
                "{} bytes, shorter than the {CONTAINER_HEADER_LEN}-byte header",
                b.len()
            ),
        ));
    }
    if b[..4] != MAGIC {
        return Err(framing(
            0,
            format!("magic {:02x?}, expected \"VMST\"", &b[..4]),
        ));
    }
    let version = le_u32(&b[4..8]);
    if version != STATE_FORMAT_VERSION {
        return Err(VmError::StateVersion {
            component: None,
            found: version,
            oldest: STATE_FORMAT_VERSION,
            newest: STATE_FORMAT_VERSION,
        });
    }
    let count = le_u32(&b[8..12]) as usize;
    if !(1..=MAX_SECTIONS).contains(&count) {
        return Err(framing(
            8,
            format!("{count} sections, expected 1..={MAX_SECTIONS}"),
        ));
    }
    let mut at = CONTAINER_HEADER_LEN;
    let mut sections = Vec::new();
    for i in 0..count {
        let rest = &b[at..];
        let short = || {
            framing(
                at,
                format!(
                    "section {i} of {count} runs past the end ({} bytes left)",
                    rest.len()
                ),
            )
        };
        let n = usize::from(*rest.first().ok_or_else(short)?);
        let name = rest.get(1..1 + n).ok_or_else(short)?;
        if !valid_name(name) {
            return Err(framing(
                at,
                format!(
                    "section {i}: name {:?} is not 1..={MAX_NAME_LEN} bytes of [a-z0-9_]",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let fixed = rest.get(1 + n..9 + n).ok_or_else(short)?;
        let version = le_u32(&fixed[..4]);
        let len = le_u32(&fixed[4..]) as usize;
        let body = rest.get(9 + n..9 + n + len).ok_or_else(short)?;
        sections.push(Section {
            // valid_name admits ASCII only.
            name: std::str::from_utf8(name).map_err(|_| short())?,
            version,
            body,
        });
        at += 9 + n + len;
    }
    if at != b.len() {
        return Err(framing(
            at,
            format!("{} bytes after the last of {count} sections", b.len() - at),
        ));
    }
    Ok(sections)
}

/// A state of the JSON format this one replaced (format version 1): refused as that version.
fn legacy_version(b: &[u8]) -> VmError {
    #[derive(Deserialize)]
    struct Legacy {
        version: u32,
    }
    match serde_json::from_slice::<Legacy>(b) {
        Ok(l) => VmError::StateVersion {
            component: None,
            found: l.version,
            oldest: STATE_FORMAT_VERSION,
            newest: STATE_FORMAT_VERSION,
        },
        Err(e) => framing(
            0,
            format!("not a machine state (JSON without a version: {e})"),
        ),
    }
}

/// Writes a machine state: the header, then [`SectionWriter::section`] by section.
#[derive(Debug)]
pub struct SectionWriter {
    out: Vec<u8>,
    count: usize,
}

impl Default for SectionWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl SectionWriter {
    /// An empty container of the current format version.
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(64 << 10);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        SectionWriter { out, count: 0 }
    }

    /// Appends a section. Refuses a name [`valid_name`] refuses, a body longer than `u32::MAX`
    /// and more than [`MAX_SECTIONS`] sections: what the reader would refuse is never written.
    pub fn section(&mut self, name: &str, version: u32, body: &[u8]) -> Result<(), VmError> {
        let bad = |reason: String| VmError::StateComponent {
            component: "sections",
            vcpu: None,
            reason,
        };
        if !valid_name(name.as_bytes()) {
            return Err(bad(format!("invalid component name {name:?}")));
        }
        if self.count == MAX_SECTIONS {
            return Err(bad(format!("more than {MAX_SECTIONS} sections")));
        }
        let len = u32::try_from(body.len())
            .map_err(|_| bad(format!("{name}: body of {} bytes", body.len())))?;
        // valid_name bounds the length to MAX_NAME_LEN.
        self.out.push(name.len() as u8);
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(&version.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(body);
        self.count += 1;
        Ok(())
    }

    /// The encoded machine state.
    pub fn finish(mut self) -> Vec<u8> {
        // MAX_SECTIONS fits a u32.
        self.out[8..12].copy_from_slice(&(self.count as u32).to_le_bytes());
        self.out
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Builds a component's body from the primitives of the documented layout.
#[derive(Debug, Default)]
pub struct BodyWriter {
    out: Vec<u8>,
    /// The first value that could not be written (a list or blob too long for its u32 length).
    error: Option<VmError>,
}

impl BodyWriter {
    /// An empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// A byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A u32 count or length; `field` names it if it does not fit.
    fn len(&mut self, field: &'static str, n: usize) {
        match u32::try_from(n) {
            Ok(n) => self.u32(n),
            Err(_) => {
                self.error.get_or_insert(VmError::StateComponent {
                    component: field,
                    vcpu: None,
                    reason: format!("{n} bytes or entries do not fit a u32 length"),
                });
            }
        }
    }

    /// A blob: u32 length, then the bytes.
    pub fn blob(&mut self, field: &'static str, b: &[u8]) {
        self.len(field, b.len());
        self.out.extend_from_slice(b);
    }

    /// A KVM struct, as a blob of exactly its bytes.
    pub fn kvm<T: Serialize>(&mut self, field: &'static str, v: &T) {
        let at = self.out.len();
        self.u32(0);
        let start = self.out.len();
        if let Err(e) = v.serialize(RawBytes(&mut self.out)) {
            self.out.truncate(at);
            self.error.get_or_insert(VmError::StateComponent {
                component: field,
                vcpu: None,
                reason: format!("not encodable as its bytes: {e}"),
            });
            return;
        }
        let n = self.out.len() - start;
        // A KVM struct is a few KiB at most.
        self.out[at..start].copy_from_slice(&(n as u32).to_le_bytes());
    }

    /// A list: u32 count, then each item as `item` writes it.
    pub fn list<T>(
        &mut self,
        field: &'static str,
        items: &[T],
        mut item: impl FnMut(&mut Self, &T),
    ) {
        self.len(field, items.len());
        for i in items {
            item(self, i);
        }
    }

    /// An optional value: u8 0, or u8 1 and the value as `some` writes it.
    pub fn opt<T>(&mut self, v: Option<&T>, some: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                some(self, v);
            }
        }
    }

    /// The body, or the first error.
    pub fn finish(self) -> Result<Vec<u8>, VmError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }
}

/// Reads a component's body. Every read names its field; one that runs past the end of the body
/// is refused as a bad `field`, and nothing is allocated beyond what the body holds.
#[derive(Debug)]
pub struct BodyReader<'a> {
    section: &'static str,
    b: &'a [u8],
    at: usize,
}

impl<'a> BodyReader<'a> {
    /// A reader over the body of section `section`.
    pub fn new(section: &'static str, b: &'a [u8]) -> Self {
        BodyReader { section, b, at: 0 }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], VmError> {
        let left = self.b.len() - self.at;
        if n > left {
            return Err(VmError::StateComponent {
                component: field,
                vcpu: None,
                reason: format!(
                    "{n} bytes at byte {} run past the end of the {} section ({left} left)",
                    self.at, self.section
                ),
            });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    /// A byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, VmError> {
        Ok(self.take(field, 1)?[0])
    }

    /// A little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, VmError> {
        Ok(le_u32(self.take(field, 4)?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, VmError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(field, 8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// A blob.
    pub fn blob(&mut self, field: &'static str) -> Result<&'a [u8], VmError> {
        let n = self.u32(field)? as usize;
        self.take(field, n)
    }

    /// A blob holding UTF-8 text.
    pub fn text(&mut self, field: &'static str) -> Result<String, VmError> {
        let b = self.blob(field)?;
        String::from_utf8(b.to_vec()).map_err(|e| VmError::StateComponent {
            component: field,
            vcpu: None,
            reason: format!("not UTF-8: {e}"),
        })
    }

    /// A list count, refused above `max` before any item is read.
    pub fn count(&mut self, field: &'static str, max: usize) -> Result<usize, VmError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(VmError::StateComponent {
                component: field,
                vcpu: None,
                reason: format!("{n} entries, at most {max}"),
            });
        }
        Ok(n)
    }

    /// An optional value's presence byte: 0 absent, 1 present.
    pub fn present(&mut self, field: &'static str) -> Result<bool, VmError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(VmError::StateComponent {
                component: field,
                vcpu: None,
                reason: format!("presence byte {v}, expected 0 or 1"),
            }),
        }
    }

    /// Ends the body: refuses bytes no field read.
    pub fn finish(self) -> Result<(), VmError> {
        let left = self.b.len() - self.at;
        if left != 0 {
            return Err(VmError::StateComponent {
                component: self.section,
                vcpu: None,
                reason: format!("{left} bytes after its last field"),
            });
        }
        Ok(())
    }
}

/// A KVM struct from exactly `size_of::<T>()` bytes, refused as a bad `field` otherwise.
pub fn exact<T: for<'de> Deserialize<'de>>(b: &[u8], field: &'static str) -> Result<T, VmError> {
    let want = std::mem::size_of::<T>();
    let bad = |reason| VmError::StateComponent {
        component: field,
        vcpu: None,
        reason,
    };
    if b.len() != want {
        return Err(bad(format!("{} bytes, expected {want}", b.len())));
    }
    // kvm-bindings deserializes its structs from their bytes (zero-filling a short input, which
    // the length check rules out); with the length right it is a copy.
    T::deserialize(BytesDeserializer::<ValueError>::new(b)).map_err(|e| bad(e.to_string()))
}

/// A serde serializer that appends what `serialize_bytes` gives and refuses everything else:
/// kvm-bindings serializes each of its structs as exactly its bytes.
struct RawBytes<'a>(&'a mut Vec<u8>);

fn not_bytes() -> ValueError {
    serde::ser::Error::custom("a KVM struct serializes as bytes only")
}

macro_rules! refuse {
    ($($name:ident($t:ty)),* $(,)?) => {
        $(fn $name(self, _: $t) -> Result<(), ValueError> { Err(not_bytes()) })*
    };
}

impl Serializer for RawBytes<'_> {
    type Ok = ();
    type Error = ValueError;
    type SerializeSeq = Impossible<(), ValueError>;
    type SerializeTuple = Impossible<(), ValueError>;
    type SerializeTupleStruct = Impossible<(), ValueError>;
    type SerializeTupleVariant = Impossible<(), ValueError>;
    type SerializeMap = Impossible<(), ValueError>;
    type SerializeStruct = Impossible<(), ValueError>;
    type SerializeStructVariant = Impossible<(), ValueError>;

    fn serialize_bytes(self, v: &[u8]) -> Result<(), ValueError> {
        self.0.extend_from_slice(v);
        Ok(())
    }

    refuse!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_unit_struct(&'static str),
    );

    fn serialize_none(self) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_unit(self) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), ValueError> {
        Err(not_bytes())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, ValueError> {
        Err(not_bytes())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, ValueError> {
        Err(not_bytes())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, ValueError> {
        Err(not_bytes())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, ValueError> {
        Err(not_bytes())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, ValueError> {
        Err(not_bytes())
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, ValueError> {
        Err(not_bytes())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, ValueError> {
        Err(not_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    #[test]
    fn kvm_structs_are_their_bytes_and_back() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xffff_8000_0000_1000,
            rflags: 2,
            ..Default::default()
        };
        let mut w = BodyWriter::new();
        w.kvm("regs", &regs);
        let b = w.finish().unwrap();
        assert_eq!(b.len(), 4 + std::mem::size_of::<kvm_regs>());
        assert_eq!(&b[4..12], &regs.rax.to_le_bytes());
        let mut r = BodyReader::new("t", &b);
        let back: kvm_regs = exact(r.blob("regs").unwrap(), "regs").unwrap();
        r.finish().unwrap();
        assert_eq!(back, regs);
        let e = exact::<kvm_sregs>(&b[4..], "sregs").unwrap_err();
        assert!(e.to_string().contains("sregs"), "{e}");
    }

    #[test]
    fn framing_is_checked() {
        let mut w = SectionWriter::new();
        w.section("a_1", 1, b"xyz").unwrap();
        assert!(w.section("Bad", 1, b"").is_err());
        let b = w.finish();
        let s = read_sections(&b).unwrap();
        assert_eq!(
            s,
            [Section {
                name: "a_1",
                version: 1,
                body: b"xyz"
            }]
        );
        for cut in 0..b.len() {
            assert!(
                matches!(read_sections(&b[..cut]), Err(VmError::StateFraming { .. })),
                "cut to {cut}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            read_sections(&long),
            Err(VmError::StateFraming { at, .. }) if at == b.len()
        ));
        let mut upper = b.clone();
        upper[CONTAINER_HEADER_LEN + 1] = b'A';
        assert!(read_sections(&upper).is_err());
        let mut none = b.clone();
        none[8] = 0;
        assert!(read_sections(&none).is_err());
        let mut newer = b.clone();
        newer[4] = 3;
        assert!(matches!(
            read_sections(&newer),
            Err(VmError::StateVersion {
                component: None,
                found: 3,
                ..
            })
        ));
        assert!(matches!(
            read_sections(br#"{"version":1,"config":{}}"#),
            Err(VmError::StateVersion {
                component: None,
                found: 1,
                ..
            })
        ));
    }
}
