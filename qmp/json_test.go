package qmp

import (
	"encoding/json"
	"testing"
)

func TestParseJSON(t *testing.T) {
	for _, tc := range []struct{ in, err string }{
		{`{"a": 1}`, ""},
		{`12`, ""},
		{` `, "Expecting a JSON value"},
		{`1 2`, "Expecting at most one JSON value"},
		{`{"a": 1`, "JSON parse error, premature EOI"},
		{`{"a" 1`, "JSON parse error, missing : in object pair"},
		{`"abc`, "JSON parse error, stray '\"abc'"},
		{`nul`, "JSON parse error, invalid keyword 'nul'"},
		// Texts are printed as QEMU's JSON writer prints them: invalid
		// UTF-8 as U+FFFD, C0 80 as NUL, a NUL byte ends the token.
		{"\"ab\xff", "JSON parse error, stray '\"ab\uFFFD'"},
		{"\"a\xc0\x80\xff", "JSON parse error, stray '\"a\x00\uFFFD'"},
		{"\"ab\x00cd\"", "JSON parse error, stray '\"ab'"},
		{"\"\\u\xc3\xa9z\xe2\"", "JSON parse error, \\u\u00e9z\uFFFD is not a valid Unicode character"},
	} {
		_, err := ParseJSON(tc.in)
		got := ""
		if err != nil {
			e, ok := err.(*Error)
			if !ok || e.Class != GenericError {
				t.Errorf("%q: error %#v", tc.in, err)
			}
			got = err.Error()
		}
		if got != tc.err {
			t.Errorf("%q: got %q want %q", tc.in, got, tc.err)
		}
	}
}

// The monitor's parser reports errors as GenericError replies, with
// QEMU's printed text.
func TestParserErrors(t *testing.T) {
	var got []any
	p := NewParser(func(v any, err error) {
		if err != nil {
			got = append(got, err)
			return
		}
		got = append(got, v)
	})
	p.Feed([]byte("\xff{\"b\": 2}\x01"))
	if len(got) != 3 {
		t.Fatalf("%d messages: %v", len(got), got)
	}
	if e, ok := got[0].(*Error); !ok || e.Class != GenericError || e.Desc != "JSON parse error, stray '\uFFFD'" {
		t.Errorf("first: %#v", got[0])
	}
	if m, ok := got[1].(map[string]any); !ok || m["b"] != json.Number("2") {
		t.Errorf("second: %#v", got[1])
	}
	if e, ok := got[2].(*Error); !ok || e.Desc != "JSON parse error, stray '\x01'" {
		t.Errorf("third: %#v", got[2])
	}
}

func TestMarshal(t *testing.T) {
	for _, tc := range []struct {
		v    any
		want string
	}{
		{map[string]any{"return": map[string]any{}, "id": json.Number("1.0")}, `{"return": {}, "id": 1}`},
		{"é\x00\u2028😀", `"\u00E9\u0000\u2028\uD83D\uDE00"`},
		{[]any{json.Number("1e999"), json.Number("-0")}, `[inf, 0]`},
	} {
		if got := string(Marshal(tc.v, false)); got != tc.want {
			t.Errorf("got %s want %s", got, tc.want)
		}
	}
	if got := string(Marshal(map[string]any{"a": []any{}}, true)); got != "{\n    \"a\": [\n    ]\n}" {
		t.Errorf("pretty: %q", got)
	}
}
