package luksfmt

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// jobject is a JSON object that keeps its members' order and their raw
// values, so that LUKS2 metadata this package does not model (tokens,
// unknown members, extra fields) survives a rewrite unchanged in meaning.
type jobject struct {
	keys []string
	vals map[string]json.RawMessage
}

func newJObject() *jobject { return &jobject{vals: map[string]json.RawMessage{}} }

// parseJObject decodes raw, which must be a JSON object. Duplicate member
// names are refused: which one wins differs between parsers.
func parseJObject(raw []byte) (*jobject, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a json object")
	}
	o := newJObject()
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		k, ok := tok.(string)
		if !ok {
			return nil, errors.New("malformed json object")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		if _, dup := o.vals[k]; dup {
			return nil, fmt.Errorf("duplicate json member %q", k)
		}
		o.keys = append(o.keys, k)
		o.vals[k] = v
	}
	if _, err := dec.Token(); err != nil { // closing brace
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data after json object")
	}
	if _, err := dec.Token(); err == nil {
		return nil, errors.New("trailing data after json object")
	}
	return o, nil
}

func (o *jobject) get(k string) (json.RawMessage, bool) {
	v, ok := o.vals[k]
	return v, ok
}

// set replaces a member in place or appends a new one.
func (o *jobject) set(k string, v json.RawMessage) {
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
}

func (o *jobject) del(k string) {
	if _, ok := o.vals[k]; !ok {
		return
	}
	delete(o.vals, k)
	for i, kk := range o.keys {
		if kk == k {
			o.keys = append(o.keys[:i:i], o.keys[i+1:]...)
			break
		}
	}
}

func (o *jobject) setObj(k string, v *jobject) { o.set(k, v.marshal()) }

// marshal returns the object as compact JSON: members in order, values as
// they were read with insignificant whitespace removed.
func (o *jobject) marshal() json.RawMessage {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(jsonString(k))
		b.WriteByte(':')
		if err := json.Compact(&b, o.vals[k]); err != nil {
			// Values come from the decoder or from this package's encoder
			// and are valid JSON.
			panic(fmt.Sprintf("luksfmt: invalid raw json for member %q: %v", k, err))
		}
	}
	b.WriteByte('}')
	return b.Bytes()
}

// jsonString encodes s as a JSON string without HTML escaping (json-c, which
// cryptsetup uses, does not escape <, > or &).
func jsonString(s string) json.RawMessage {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	return bytes.TrimRight(b.Bytes(), "\n")
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func jsonInt(n uint64) json.RawMessage { return json.RawMessage(strconv.FormatUint(n, 10)) }

// jsonU64String encodes n the way LUKS2 stores 64-bit values: as a decimal
// string.
func jsonU64String(n uint64) json.RawMessage { return jsonString(strconv.FormatUint(n, 10)) }

func jsonStringArray(ss []string) json.RawMessage {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(jsonString(s))
	}
	b.WriteByte(']')
	return b.Bytes()
}

// Typed accessors. Each returns an error naming the member; callers add the
// context (section and id) and wrap ErrCorrupt.

func (o *jobject) has(k string) bool { _, ok := o.vals[k]; return ok }

func (o *jobject) str(k string) (string, error) {
	v, ok := o.vals[k]
	if !ok {
		return "", fmt.Errorf("missing %q", k)
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return "", fmt.Errorf("%q is not a string", k)
	}
	if s == "" {
		return "", fmt.Errorf("%q is empty", k)
	}
	return s, nil
}

func (o *jobject) obj(k string) (*jobject, error) {
	v, ok := o.vals[k]
	if !ok {
		return nil, fmt.Errorf("missing %q", k)
	}
	sub, err := parseJObject(v)
	if err != nil {
		return nil, fmt.Errorf("%q: %v", k, err)
	}
	return sub, nil
}

// u32 reads a JSON integer in [0, 2^32).
func (o *jobject) u32(k string) (uint32, error) {
	v, ok := o.vals[k]
	if !ok {
		return 0, fmt.Errorf("missing %q", k)
	}
	n, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not an unsigned 32-bit integer", k)
	}
	return uint32(n), nil
}

// u64s reads a 64-bit unsigned integer stored as a decimal string.
func (o *jobject) u64s(k string) (uint64, error) {
	s, err := o.str(k)
	if err != nil {
		return 0, err
	}
	return parseDecimal(k, s)
}

func parseDecimal(k, s string) (uint64, error) {
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q is not a decimal number", k)
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is out of range", k)
	}
	return n, nil
}

func (o *jobject) strArray(k string) ([]string, error) {
	v, ok := o.vals[k]
	if !ok {
		return nil, fmt.Errorf("missing %q", k)
	}
	var ss []string
	if err := json.Unmarshal(v, &ss); err != nil || ss == nil && !bytes.Equal(bytes.TrimSpace(v), []byte("[]")) {
		return nil, fmt.Errorf("%q is not an array of strings", k)
	}
	return ss, nil
}

func (o *jobject) b64(k string) ([]byte, error) {
	s, err := o.str(k)
	if err != nil {
		return nil, err
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%q is not base64", k)
	}
	return b, nil
}

// idKey parses an object key that names a keyslot, token, digest or
// segment: a canonical decimal number below limit.
func idKey(k string, limit int) (int, bool) {
	n, err := strconv.Atoi(k)
	if err != nil || n < 0 || n >= limit || strconv.Itoa(n) != k {
		return 0, false
	}
	return n, true
}
