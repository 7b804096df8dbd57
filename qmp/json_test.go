package qmp

import (
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

func parseAll(in string, l Limits) (vals []any, errs []string) {
	p := NewParserLimits(func(v any, err error) {
		if err != nil {
			errs = append(errs, err.Error())
			return
		}
		vals = append(vals, v)
	}, l)
	p.Feed([]byte(in))
	return vals, errs
}

func TestParserValues(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want any
	}{
		{`{"a": [1, -2.5e3, true, false, null, "s"]}`, map[string]any{"a": []any{json.Number("1"), json.Number("-2.5e3"), true, false, nil, "s"}}},
		{`{'single': 'it"s'}`, map[string]any{"single": `it"s`}},
		{`"esc \" \' \\ \/ \b \f \n \r \t \u00e9 \ud83d\ude00 \u0000"`, "esc \" ' \\ / \b \f \n \r \t é 😀 \x00"},
		{"\"\xc0\x80\"", "\x00"},
		{`[]`, []any{}},
		{`{}`, map[string]any{}},
	} {
		vals, errs := parseAll(tc.in+"\n", Limits{})
		if len(errs) > 0 || len(vals) != 1 || !reflect.DeepEqual(vals[0], tc.want) {
			t.Errorf("%s: got %#v %v", tc.in, vals, errs)
		}
	}
}

func TestParserLimits(t *testing.T) {
	l := Limits{TokenSize: 100, TokenCount: 10, Nesting: 3}
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
	_, errs := parseAll(strings.Repeat("z", 2000)+" ", Limits{})
	if len(errs) != 1 || len(errs[0]) != len("JSON parse error, ")+1023 {
		t.Errorf("long keyword: %d errors, %d bytes", len(errs), len(errs[0]))
	}
}

func TestParseJSON(t *testing.T) {
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
	} {
		_, err := ParseJSON(tc.in)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tc.err {
			t.Errorf("%q: got %q want %q", tc.in, got, tc.err)
		}
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

func FuzzParser(f *testing.F) {
	for _, s := range corpus {
		f.Add([]byte(s))
	}
	f.Add([]byte(`["` + strings.Repeat("x", 4094) + `"]`))
	f.Add([]byte(`"` + strings.Repeat("x", 4095) + `"`))
	f.Add([]byte(`'` + strings.Repeat("y", 5000) + `'`))
	f.Add([]byte(strings.Repeat("z", 4097) + " "))
	f.Add([]byte("@" + strings.Repeat("q", 5000) + "{}"))
	f.Add([]byte(`{"execute":"blockdev-add","arguments":{"driver":"raw","file":{"driver":"file","filename":"/x"}},"id":[1,{"a":null}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		limits := Limits{TokenSize: 4096, TokenCount: 512, Nesting: 32}
		// trace records what a parser emits.
		trace := func(feed func(p *Parser)) ([]string, []any) {
			var out []string
			var vals []any
			p := NewParserLimits(func(v any, err error) {
				if err != nil {
					if _, ok := err.(*Error); !ok {
						t.Fatalf("error of type %T", err)
					}
					out = append(out, "error "+err.Error())
					return
				}
				out = append(out, string(Marshal(v, false)))
				vals = append(vals, v)
			}, limits)
			feed(p)
			p.Flush()
			return out, vals
		}
		whole, vals := trace(func(p *Parser) { p.Feed(data) })
		split, _ := trace(func(p *Parser) {
			half := len(data) / 2
			p.Feed(data[:half])
			p.Feed(data[half:])
		})
		bytewise, _ := trace(func(p *Parser) {
			for _, c := range data {
				p.feedChar(c, false)
			}
		})
		if !reflect.DeepEqual(whole, split) || !reflect.DeepEqual(whole, bytewise) {
			t.Fatalf("framing changed the result:\n%q\n%q\n%q", whole, split, bytewise)
		}
		// Every value survives encoding and parsing again.
		for _, v := range vals {
			if hasInf(canonNumbers(v)) {
				continue // QEMU prints inf, which it cannot read back
			}
			enc := Marshal(v, false)
			back, err := ParseJSON(string(enc))
			if err != nil {
				t.Fatalf("re-parse of %s: %v", enc, err)
			}
			if !sameTree(v, back) {
				t.Fatalf("round trip changed %#v into %#v", v, back)
			}
		}
	})
}

func hasInf(v any) bool {
	switch x := v.(type) {
	case json.Number:
		return strings.Contains(string(x), "inf")
	case map[string]any:
		for _, e := range x {
			if hasInf(e) {
				return true
			}
		}
	case []any:
		for _, e := range x {
			if hasInf(e) {
				return true
			}
		}
	}
	return false
}

// sameTree compares generic trees, numbers by value.
func sameTree(a, b any) bool {
	switch x := a.(type) {
	case json.Number:
		y, ok := b.(json.Number)
		if !ok {
			return false
		}
		fx, _ := strconv.ParseFloat(CanonNumber(string(x)), 64)
		fy, _ := strconv.ParseFloat(CanonNumber(string(y)), 64)
		return fx == fy
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, e := range x {
			if f, ok := y[k]; !ok || !sameTree(e, f) {
				return false
			}
		}
		return true
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !sameTree(x[i], y[i]) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(a, b)
}
