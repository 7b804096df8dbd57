// Package qapi decodes QMP and command-line arguments into typed Go structs
// with QEMU's strictness and error texts, and encodes results in QEMU's JSON
// member order.
//
// Input is a generic tree: map[string]any, []any, string, json.Number,
// bool and nil, as produced by the QMP parser or by keyval parsing (where all
// leaves are strings and are converted to the target type, as QEMU's keyval
// input visitor does).
//
// Struct members are named by their `json` tag; `,omitempty` marks an
// optional member. Members are visited in field order (embedded structs
// inline), so a missing or mistyped member is reported before unexpected
// ones, as QEMU's input visitor does.
package qapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"unicode"
)

// Enum is implemented by string types with a fixed set of values.
type Enum interface {
	EnumValues() []string
}

// Size is QAPI's "size" type: an unsigned 64-bit byte count that keyval
// input may write with a k/M/G/T/P/E suffix.
type Size uint64

// Unmarshaler is implemented by types that decode themselves (alternates
// such as BlockdevRef). path is the member's full name for error messages.
type Unmarshaler interface {
	UnmarshalQAPI(d *Decoder, v any, path string) error
}

// Decoder carries the input mode and a context value for Unmarshalers.
type Decoder struct {
	// Keyval is true for command-line input: leaves are strings.
	Keyval bool
	// Ctx is available to Unmarshalers (the block graph uses it).
	Ctx any
}

// Error is a decoding error; its text is QEMU's.
type Error struct{ Msg string }

func (e *Error) Error() string { return e.Msg }

func errorf(format string, a ...any) error { return &Error{Msg: fmt.Sprintf(format, a...)} }

// Decode decodes v into the structs pointed to by dst, treating the members
// of all of them as one object (a base and a union variant, for example).
func Decode(v any, keyval bool, dst ...any) error {
	return (&Decoder{Keyval: keyval}).Decode(v, "", dst...)
}

// Decode decodes the object v at path into dst (pointers to structs).
func (d *Decoder) Decode(v any, path string, dst ...any) error {
	obj, ok := v.(map[string]any)
	if !ok {
		if v == nil && path == "" {
			obj = map[string]any{}
		} else {
			return typeError(path, "object")
		}
	}
	used := make(map[string]bool, len(obj))
	for _, t := range dst {
		rv := reflect.ValueOf(t)
		if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
			panic("qapi: Decode target must be a pointer to a struct")
		}
		if err := d.decodeMembers(obj, path, rv.Elem(), used); err != nil {
			return err
		}
	}
	return CheckUnexpected(obj, path, used)
}

// CheckUnexpected reports the first member of obj (in sorted order) not in
// used, with QEMU's text.
func CheckUnexpected(obj map[string]any, path string, used map[string]bool) error {
	var extra []string
	for k := range obj {
		if !used[k] {
			extra = append(extra, k)
		}
	}
	if len(extra) > 0 {
		sort.Strings(extra)
		return errorf("Parameter '%s' is unexpected", join(path, extra[0]))
	}
	return nil
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func typeError(path, want string) error {
	if path == "" {
		// QEMU names the top level "null" in this message.
		path = "null"
	}
	return errorf("Invalid parameter type for '%s', expected: %s", path, want)
}

// Member describes one struct field as a QAPI member.
type member struct {
	name     string
	optional bool
	index    []int
}

func members(t reflect.Type) []member {
	var out []member
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
			for _, m := range members(f.Type) {
				m.index = append([]int{i}, m.index...)
				out = append(out, m)
			}
			continue
		}
		if name == "" {
			name = f.Name
		}
		out = append(out, member{name: name, optional: strings.Contains(opts, "omitempty"), index: []int{i}})
	}
	return out
}

func (d *Decoder) decodeMembers(obj map[string]any, path string, sv reflect.Value, used map[string]bool) error {
	for _, m := range members(sv.Type()) {
		val, ok := obj[m.name]
		if !ok {
			if !m.optional {
				return errorf("Parameter '%s' is missing", join(path, m.name))
			}
			continue
		}
		used[m.name] = true
		if err := d.decodeValue(val, join(path, m.name), sv.FieldByIndex(m.index)); err != nil {
			return err
		}
	}
	return nil
}

var (
	unmarshalerType = reflect.TypeOf((*Unmarshaler)(nil)).Elem()
	enumType        = reflect.TypeOf((*Enum)(nil)).Elem()
	sizeType        = reflect.TypeOf(Size(0))
	rawType         = reflect.TypeOf(json.RawMessage(nil))
)

// DecodeValue decodes one value (not necessarily an object) into the value
// pointed to by dst.
func (d *Decoder) DecodeValue(v any, path string, dst any) error {
	return d.decodeValue(v, path, reflect.ValueOf(dst).Elem())
}

func (d *Decoder) decodeValue(v any, path string, fv reflect.Value) error {
	if fv.CanAddr() && fv.Addr().Type().Implements(unmarshalerType) {
		return fv.Addr().Interface().(Unmarshaler).UnmarshalQAPI(d, v, path)
	}
	t := fv.Type()
	switch {
	case t == rawType:
		b, err := json.Marshal(v)
		if err != nil {
			return errorf("Invalid parameter value for '%s'", path)
		}
		fv.SetBytes(b)
		return nil
	case t == sizeType:
		n, err := d.uint(v, path, true)
		if err != nil {
			return err
		}
		fv.SetUint(n)
		return nil
	}
	switch t.Kind() {
	case reflect.Pointer:
		nv := reflect.New(t.Elem())
		if err := d.decodeValue(v, path, nv.Elem()); err != nil {
			return err
		}
		fv.Set(nv)
		return nil
	case reflect.Interface:
		if v != nil {
			fv.Set(reflect.ValueOf(v))
		}
		return nil
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			return typeError(path, "string")
		}
		if t.Implements(enumType) {
			if !contains(reflect.Zero(t).Interface().(Enum).EnumValues(), s) {
				return errorf("Parameter '%s' does not accept value '%s'", leaf(path), s)
			}
		}
		fv.SetString(s)
		return nil
	case reflect.Bool:
		b, err := d.bool(v, path)
		if err != nil {
			return err
		}
		fv.SetBool(b)
		return nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, err := d.int(v, path)
		if err != nil {
			return err
		}
		if fv.OverflowInt(n) {
			return errorf("Parameter '%s' expects %s", leaf(path), intName(t))
		}
		fv.SetInt(n)
		return nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		n, err := d.uint(v, path, false)
		if err != nil {
			return err
		}
		if fv.OverflowUint(n) {
			return errorf("Parameter '%s' expects %s", leaf(path), intName(t))
		}
		fv.SetUint(n)
		return nil
	case reflect.Float32, reflect.Float64:
		var f float64
		switch x := v.(type) {
		case json.Number:
			var err error
			if f, err = x.Float64(); err != nil {
				return typeError(path, "number")
			}
		case string:
			var err error
			if !d.Keyval {
				return typeError(path, "number")
			}
			if f, err = strconv.ParseFloat(x, 64); err != nil {
				return errorf("Parameter '%s' expects number", path)
			}
		default:
			return typeError(path, "number")
		}
		fv.SetFloat(f)
		return nil
	case reflect.Slice:
		list, ok := v.([]any)
		if !ok {
			return typeError(path, "array")
		}
		s := reflect.MakeSlice(t, len(list), len(list))
		for i, e := range list {
			if err := d.decodeValue(e, fmt.Sprintf("%s[%d]", path, i), s.Index(i)); err != nil {
				return err
			}
		}
		fv.Set(s)
		return nil
	case reflect.Map:
		obj, ok := v.(map[string]any)
		if !ok || t.Key().Kind() != reflect.String {
			return typeError(path, "object")
		}
		m := reflect.MakeMapWithSize(t, len(obj))
		for k, e := range obj {
			ev := reflect.New(t.Elem()).Elem()
			if err := d.decodeValue(e, join(path, k), ev); err != nil {
				return err
			}
			m.SetMapIndex(reflect.ValueOf(k).Convert(t.Key()), ev)
		}
		fv.Set(m)
		return nil
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return typeError(path, "object")
		}
		used := make(map[string]bool, len(obj))
		if err := d.decodeMembers(obj, path, fv, used); err != nil {
			return err
		}
		return CheckUnexpected(obj, path, used)
	}
	return fmt.Errorf("qapi: cannot decode into %s", t)
}

func intName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int8:
		return "int8_t"
	case reflect.Int16:
		return "int16_t"
	case reflect.Int32:
		return "int32_t"
	case reflect.Uint8:
		return "uint8_t"
	case reflect.Uint16:
		return "uint16_t"
	case reflect.Uint32:
		return "uint32_t"
	}
	return "integer"
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (d *Decoder) bool(v any, path string) (bool, error) {
	switch x := v.(type) {
	case bool:
		return x, nil
	case string:
		if d.Keyval {
			switch x {
			case "on", "yes", "true", "y":
				return true, nil
			case "off", "no", "false", "n":
				return false, nil
			}
			return false, errorf("Parameter '%s' expects 'on' or 'off'", path)
		}
	}
	return false, typeError(path, "boolean")
}

func (d *Decoder) int(v any, path string) (int64, error) {
	switch x := v.(type) {
	case json.Number:
		n, err := strconv.ParseInt(string(x), 10, 64)
		if err != nil {
			return 0, typeError(path, "integer")
		}
		return n, nil
	case string:
		if d.Keyval {
			n, err := parseCInt(x)
			if err != nil {
				return 0, errorf("Parameter '%s' expects integer", path)
			}
			return n, nil
		}
	}
	return 0, typeError(path, "integer")
}

func (d *Decoder) uint(v any, path string, size bool) (uint64, error) {
	switch x := v.(type) {
	case json.Number:
		if n, err := strconv.ParseUint(string(x), 10, 64); err == nil {
			return n, nil
		}
		// QEMU accepts a negative int64 for uint64 members and wraps it.
		if n, err := strconv.ParseInt(string(x), 10, 64); err == nil {
			return uint64(n), nil
		}
		if f, err := strconv.ParseFloat(string(x), 64); err == nil && f == math.Trunc(f) && f >= 0 && f < 1<<64 {
			return uint64(f), nil
		}
	case string:
		if d.Keyval {
			if size {
				n, err := ParseSize(x)
				if err != nil {
					return 0, errorf("Parameter '%s' expects size", path)
				}
				return n, nil
			}
			n, err := strconv.ParseUint(x, 0, 64)
			if err != nil {
				return 0, errorf("Parameter '%s' expects integer", path)
			}
			return n, nil
		}
	}
	return 0, errorf("Parameter '%s' expects uint64", path)
}

// leaf is the member name QEMU's generic visitors print: the last
// component of the path, or "null" for list elements and the top level.
func leaf(path string) string {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		path = path[i+1:]
	}
	if path == "" || strings.HasSuffix(path, "]") {
		return "null"
	}
	return path
}

func parseCInt(s string) (int64, error) {
	return strconv.ParseInt(s, 0, 64)
}

// ParseSize parses a byte count with an optional k/M/G/T/P/E suffix (powers
// of 1024, case-insensitive; 'b' or 'B' means bytes), as qemu_strtosz does.
func ParseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, errors.New("empty size")
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
		i++
	}
	num, suffix := s[:i], s[i:]
	if num == "" {
		return 0, errors.New("invalid size")
	}
	mult := uint64(1)
	if suffix != "" {
		if len(suffix) != 1 {
			return 0, errors.New("invalid size suffix")
		}
		switch unicode.ToLower(rune(suffix[0])) {
		case 'b':
		case 'k':
			mult = 1 << 10
		case 'm':
			mult = 1 << 20
		case 'g':
			mult = 1 << 30
		case 't':
			mult = 1 << 40
		case 'p':
			mult = 1 << 50
		case 'e':
			mult = 1 << 60
		default:
			return 0, errors.New("invalid size suffix")
		}
	}
	if strings.Contains(num, ".") {
		if mult == 1 {
			return 0, errors.New("fractional size needs a suffix")
		}
		f, err := strconv.ParseFloat(num, 64)
		if err != nil {
			return 0, err
		}
		v := f * float64(mult)
		if v >= 1<<64 {
			return 0, errors.New("size too large")
		}
		return uint64(v), nil
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, err
	}
	if n > math.MaxUint64/mult {
		return 0, errors.New("size too large")
	}
	return n * mult, nil
}

// Opaque captures a member's value undecoded (for alternates and unions a
// handler decodes itself after the rest of the arguments).
type Opaque struct{ V any }

// UnmarshalQAPI implements Unmarshaler.
func (o *Opaque) UnmarshalQAPI(_ *Decoder, v any, _ string) error {
	o.V = v
	return nil
}

// WellFormedID is QEMU's id_wellformed, the rule for object ids, export
// ids and node names: a letter, then letters, digits, '-', '.' and '_'.
func WellFormedID(s string) bool {
	if s == "" {
		return false
	}
	c := s[0]
	if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}
