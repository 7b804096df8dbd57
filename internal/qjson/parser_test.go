package qjson

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func parseAll(in string, o Options) (vals []any, errs []string) {
	p := NewParser(func(v any, err error) {
		if err != nil {
			errs = append(errs, err.Error())
			return
		}
		vals = append(vals, v)
	}, o)
	p.Feed([]byte(in))
	return vals, errs
}

func TestParserValues(t *testing.T) {
	for _, tc := range []struct {
		in       string
		want     any
		modified any // with ModifiedUTF8, when it differs
	}{
		{in: `{"a": [1, -2.5e3, true, false, null, "s"]}`, want: map[string]any{"a": []any{json.Number("1"), json.Number("-2.5e3"), true, false, nil, "s"}}},
		{in: `{'single': 'it"s'}`, want: map[string]any{"single": `it"s`}},
		{in: `"esc \" \' \\ \/ \b \f \n \r \t \u00e9 \ud83d\ude00 \u0000"`, want: "esc \" ' \\ / \b \f \n \r \t é 😀 \x00",
			modified: "esc \" ' \\ / \b \f \n \r \t é 😀 \xc0\x80"},
		{in: "\"\xc0\x80\"", want: "\x00", modified: "\xc0\x80"},
		{in: `{"\u0000": "x\u0000"}`, want: map[string]any{"\x00": "x\x00"}, modified: map[string]any{"\xc0\x80": "x\xc0\x80"}},
		{in: `[]`, want: []any{}},
		{in: `{}`, want: map[string]any{}},
	} {
		for _, mod := range []bool{false, true} {
			want := tc.want
			if mod && tc.modified != nil {
				want = tc.modified
			}
			vals, errs := parseAll(tc.in+"\n", Options{ModifiedUTF8: mod})
			if len(errs) > 0 || len(vals) != 1 || !reflect.DeepEqual(vals[0], want) {
				t.Errorf("%s (modified UTF-8 %v): got %#v %v", tc.in, mod, vals, errs)
			}
		}
	}
}

func TestParserLimits(t *testing.T) {
	l := Options{TokenSize: 100, TokenCount: 10, Nesting: 3}
	for _, tc := range []struct {
		in   string
		errs []string
	}{
		{`[[[1]]]`, nil},
		{`[[[[`, []string{"JSON nesting depth limit exceeded"}},
		{`[1,2,3,4,5]`, []string{"JSON token count limit exceeded"}},
		// The string overflows; the rest is lexed as a keyword that is too
		// long as well, and the closing quote opens a new string.
		{`"` + strings.Repeat("x", 200) + `"`, []string{"JSON token size limit exceeded", "JSON token size limit exceeded"}},
		{`"` + strings.Repeat("x", 150) + `"`, []string{"JSON token size limit exceeded", "JSON parse error, invalid keyword '" + strings.Repeat("x", 50) + "'"}},
	} {
		_, errs := parseAll(tc.in, l)
		if !reflect.DeepEqual(errs, tc.errs) {
			t.Errorf("%.20s: got %q want %q", tc.in, errs, tc.errs)
		}
	}
	// A long keyword's message is cut like QEMU's 1024-byte buffer.
	_, errs := parseAll(strings.Repeat("z", 2000)+" ", Options{})
	if len(errs) != 1 || len(errs[0]) != len("JSON parse error, ")+1023 {
		t.Errorf("long keyword: %d errors, %d bytes", len(errs), len(errs[0]))
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct{ in, err string }{
		{`{"a": 1}`, ""},
		{`12`, ""},
		{` `, "Expecting a JSON value"},
		{`1 2`, "Expecting at most one JSON value"},
		{`{"a": 1`, "JSON parse error, premature EOI"},
		{`[1,`, "JSON parse error, premature EOI"},
		{`{"a" 1`, "JSON parse error, missing : in object pair"},
		{`"abc`, "JSON parse error, stray '\"abc'"},
		{`{"a": 1} x`, "Expecting at most one JSON value"},
		{`nul`, "JSON parse error, invalid keyword 'nul'"},
		// Error texts hold the bytes QEMU's C strings hold: a stray token
		// up to its first NUL byte, invalid UTF-8 as it came.
		{"\"ab\xff", "JSON parse error, stray '\"ab\xff'"},
		{"\"ab\x00cd\"", "JSON parse error, stray '\"ab'"},
		{"\"\\u\xc3\xa9zz\"", "JSON parse error, \\u\xc3\xa9zz is not a valid Unicode character"},
	} {
		_, err := Parse(tc.in, Options{})
		got := ""
		if err != nil {
			got = err.Error()
			if _, ok := err.(*Error); !ok {
				t.Errorf("%q: error of type %T", tc.in, err)
			}
		}
		if got != tc.err {
			t.Errorf("%q: got %q want %q", tc.in, got, tc.err)
		}
	}
}

func TestPrintable(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"plain", "plain"},
		{"\xff", "\uFFFD"},
		{"a\xc3(b", "a\uFFFD(b"},
		{"\xc0\x80", "\x00"},
		{"é\xed\xa0\x80", "é\uFFFD"}, // one sequence, a surrogate
		{"ab\x00cd", "ab"},
		{"stray '\xe2\x82'", "stray '\uFFFD'"}, // cut short before the quote
	} {
		if got := Printable(tc.in); got != tc.want {
			t.Errorf("%q: got %q want %q", tc.in, got, tc.want)
		}
	}
}

func TestQDictOrder(t *testing.T) {
	for name, want := range map[string]uint32{"major": 481, "minor": 225, "micro": 225, "version": 184, "capabilities": 216, "return": 401, "id": 486} {
		if got := Bucket(name); got != want {
			t.Errorf("Bucket(%q) = %d, want %d", name, got, want)
		}
	}
	// QEMU inserts query-version's members as declared (major, minor,
	// micro) and prints {"micro": 22, "minor": 2, "major": 7}: minor and
	// micro share a bucket, the newer first.
	for _, tc := range []struct{ in, want []string }{
		{[]string{"major", "minor", "micro"}, []string{"micro", "minor", "major"}},
		{[]string{"micro", "major", "minor"}, []string{"minor", "micro", "major"}},
		{[]string{"version", "capabilities"}, []string{"version", "capabilities"}},
		{nil, nil},
	} {
		got := append([]string(nil), tc.in...)
		SortQDict(got, func(s *string) string { return *s })
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: got %q want %q", tc.in, got, tc.want)
		}
	}
}
