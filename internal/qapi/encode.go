package qapi

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"blockd/internal/qjson"
)

// Marshal encodes v the way QEMU's QMP server prints a QObject: ", " and
// ": " separators, non-ASCII escaped as upper-case \uXXXX, and object members
// in QDict iteration order (qjson.SortQDict), a function of the member
// names and their insertion (QAPI declaration) order. Reproducing it makes
// our replies byte-identical to QEMU's.
//
// Struct fields are members in field order, with encoding/json's tag
// semantics (name, omitempty, "-"). Maps are inserted in sorted key order.
func Marshal(v any) []byte {
	var b strings.Builder
	encode(&b, reflect.ValueOf(v), -1)
	return []byte(b.String())
}

// MarshalPretty is Marshal with QEMU's pretty layout (4-space indentation).
func MarshalPretty(v any) []byte {
	var b strings.Builder
	encode(&b, reflect.ValueOf(v), 0)
	return []byte(b.String())
}

type kv struct {
	name string
	val  reflect.Value
}

var objectType = reflect.TypeOf(Object(nil))

var marshalerType = reflect.TypeOf((*json.Marshaler)(nil)).Elem()

func newline(b *strings.Builder, indent int) {
	if indent >= 0 {
		b.WriteByte('\n')
		for i := 0; i < indent; i++ {
			b.WriteString("    ")
		}
	}
}

func encode(b *strings.Builder, v reflect.Value, indent int) {
	if !v.IsValid() {
		b.WriteString("null")
		return
	}
	if v.Type() == reflect.TypeOf(json.Number("")) {
		b.WriteString(v.String())
		return
	}
	if v.Type() == rawType {
		var x any
		d := json.NewDecoder(strings.NewReader(string(v.Bytes())))
		d.UseNumber()
		if d.Decode(&x) == nil {
			encode(b, reflect.ValueOf(x), indent)
		} else {
			b.WriteString("null")
		}
		return
	}
	if v.Kind() != reflect.Pointer && v.Kind() != reflect.Interface && v.Type().Implements(marshalerType) {
		raw, err := v.Interface().(json.Marshaler).MarshalJSON()
		if err == nil {
			encode(b, reflect.ValueOf(json.RawMessage(raw)), indent)
			return
		}
	}
	if v.Type() == objectType {
		o := v.Interface().(Object)
		m := make([]kv, len(o))
		for i, e := range o {
			m[i] = kv{name: e.Name, val: reflect.ValueOf(e.Value)}
		}
		writeObject(b, m, indent)
		return
	}
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			b.WriteString("null")
			return
		}
		encode(b, v.Elem(), indent)
	case reflect.Bool:
		if v.Bool() {
			b.WriteString("true")
		} else {
			b.WriteString("false")
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		b.WriteString(strconv.FormatInt(v.Int(), 10))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		b.WriteString(strconv.FormatUint(v.Uint(), 10))
	case reflect.Float32, reflect.Float64:
		f := v.Float()
		if math.IsInf(f, 0) || math.IsNaN(f) {
			b.WriteString("null")
			return
		}
		b.WriteString(strconv.FormatFloat(f, 'g', 17, 64))
	case reflect.String:
		writeString(b, v.String())
	case reflect.Slice, reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			b.WriteString("[]")
			return
		}
		b.WriteByte('[')
		for i := 0; i < v.Len(); i++ {
			if i > 0 {
				b.WriteByte(',')
				if indent < 0 {
					b.WriteByte(' ')
				}
			}
			newline(b, next(indent))
			encode(b, v.Index(i), next(indent))
		}
		if indent >= 0 {
			newline(b, indent)
		}
		b.WriteByte(']')
	case reflect.Map:
		keys := v.MapKeys()
		names := make([]string, len(keys))
		for i, k := range keys {
			names[i] = fmt.Sprint(k.Interface())
		}
		sort.Strings(names)
		m := make([]kv, len(names))
		for i, n := range names {
			m[i] = kv{name: n, val: v.MapIndex(reflect.ValueOf(n).Convert(v.Type().Key()))}
		}
		writeObject(b, m, indent)
	case reflect.Struct:
		writeObject(b, structMembers(v, nil), indent)
	default:
		b.WriteString("null")
	}
}

func next(indent int) int {
	if indent < 0 {
		return -1
	}
	return indent + 1
}

func structMembers(v reflect.Value, out []kv) []kv {
	t := v.Type()
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
		fv := v.Field(i)
		if f.Anonymous && name == "" {
			if fv.Kind() == reflect.Pointer {
				if fv.IsNil() {
					continue
				}
				fv = fv.Elem()
			}
			if fv.Kind() == reflect.Struct {
				out = structMembers(fv, out)
				continue
			}
		}
		if name == "" {
			name = f.Name
		}
		if strings.Contains(opts, "omitempty") && fv.IsZero() {
			continue
		}
		if strings.Contains(opts, "omitempty") && (fv.Kind() == reflect.Slice || fv.Kind() == reflect.Map) && fv.Len() == 0 {
			continue
		}
		out = append(out, kv{name: name, val: fv})
	}
	return out
}

func writeObject(b *strings.Builder, m []kv, indent int) {
	qjson.SortQDict(m, func(e *kv) string { return e.name })
	b.WriteByte('{')
	for i, e := range m {
		if i > 0 {
			b.WriteByte(',')
			if indent < 0 {
				b.WriteByte(' ')
			}
		}
		newline(b, next(indent))
		writeString(b, e.name)
		b.WriteString(": ")
		encode(b, e.val, next(indent))
	}
	if indent >= 0 {
		newline(b, indent)
	}
	b.WriteByte('}')
}

func writeString(b *strings.Builder, s string) {
	b.WriteByte('"')
	for len(s) > 0 {
		r, n := utf8.DecodeRuneInString(s)
		s = s[n:]
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			switch {
			case r >= 0x20 && r <= 0x7e:
				b.WriteRune(r)
			case r > 0xffff:
				r -= 0x10000
				fmt.Fprintf(b, "\\u%04X\\u%04X", 0xd800|(r>>10), 0xdc00|(r&0x3ff))
			default:
				fmt.Fprintf(b, "\\u%04X", r)
			}
		}
	}
	b.WriteByte('"')
}

// Member is one member of an Object.
type Member struct {
	Name  string
	Value any
}

// Object is a JSON object whose members were inserted in this order (it is
// laid out in QDict order like a struct).
type Object []Member
