package qjson_test

import (
	"reflect"
	"strings"
	"testing"

	"blockd/internal/qapi"
	"blockd/internal/qjson"
)

// seeds are the inputs qmp's TestParserAgainstQSD compares with
// qemu-storage-daemon, and a few that reach the limits and fast paths.
var seeds = []string{
	`{"execute": }`, `{"a":1,"a":2}`, `[1,2]`, `{"id":4}`, `{"execute":5}`, `{}`, `{"execute":"query-version"}`,
	`"abc"`, `'abc'`, `'a"b'`, `"a\'b"`, `"\u0000"`, `"\u00e9"`, `"\ud800"`, `"\ud800\u0041"`, `"\udc00"`, `"\uD83D\uDE00"`,
	`"\u12"`, `"\u1"`, `"\uzzzz"`, `"\x"`, "\"\xc0\x80\"", "\"\xed\xa0\x80\"", "\"\xef\xbf\xbe\"", "\"\xf4\x90\x80\x80\"", "\"\xe2\x82\"",
	"\"\xc3\xa9\"", "\"\xff\"", "\xff", "\xfe", "\x00", "\"ab\x00cd\"", "\"ab\x01", "\t", `nul`, `nul1`, `truex`, `True`, `-`, `-a`, `01`, `1.`,
	`1.5e`, `1e+`, `1.5E-3`, `-0`, `0.0`, `1e999`, `18446744073709551616`, `-9223372036854775809`, `{"id": 1.0, "execute":"x"}`,
	`{"id": [1, {"b": null}], "execute":"x"}`, `{1:2}`, `{"a" 1}`, `{"a":1 "b":2}`, `[1 2]`, `[,]`, `[1,]`, `{"a":1,}`, `{,}`, `]`, `}`,
	`[}`, `{]`, `{"a":[}]`, `{{}:1}`, `{[]:1}`, `{"a":{"b":}}`, `:`, `,`, `{"execute":"x","arguments":[]}`, `{"execute":"x","exec-oob":"y"}`,
	"{\"execute\":\"x\",\n\"id\":\r\n7}", `garbage`, `@#$`, `{"a":"b"}garbage{"c":1}`, `[[[[]]]]`, `[[[[`, `}}}}`,
	`["` + strings.Repeat("x", 4094) + `"]`, `"` + strings.Repeat("x", 4095) + `"`, `'` + strings.Repeat("y", 5000) + `'`,
	strings.Repeat("z", 4097) + " ", "@" + strings.Repeat("q", 5000) + "{}",
	`{"execute":"blockdev-add","arguments":{"driver":"raw","file":{"driver":"file","filename":"/x"}},"id":[1,{"a":null}]}`,
}

// FuzzParser checks that how the input is split into reads does not
// change what the parser emits, that the modified-UTF-8 mode differs only
// in how it holds U+0000, and that every value survives qapi.Marshal and
// parsing again.
func FuzzParser(f *testing.F) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// trace records what a parser emits.
		trace := func(mod bool, feed func(p *qjson.Parser)) ([]string, []any) {
			var out []string
			var vals []any
			p := qjson.NewParser(func(v any, err error) {
				if err != nil {
					if _, ok := err.(*qjson.Error); !ok {
						t.Fatalf("error of type %T", err)
					}
					out = append(out, "error "+err.Error())
					return
				}
				out = append(out, string(qapi.Marshal(v)))
				vals = append(vals, v)
			}, qjson.Options{TokenSize: 4096, TokenCount: 512, Nesting: 32, ModifiedUTF8: mod})
			feed(p)
			p.Flush()
			return out, vals
		}
		whole, vals := trace(false, func(p *qjson.Parser) { p.Feed(data) })
		split, _ := trace(false, func(p *qjson.Parser) {
			half := len(data) / 2
			p.Feed(data[:half])
			p.Feed(data[half:])
		})
		bytewise, _ := trace(false, func(p *qjson.Parser) {
			for _, c := range data {
				p.FeedByte(c)
			}
		})
		if !reflect.DeepEqual(whole, split) || !reflect.DeepEqual(whole, bytewise) {
			t.Fatalf("framing changed the result:\n%q\n%q\n%q", whole, split, bytewise)
		}
		_, modVals := trace(true, func(p *qjson.Parser) { p.Feed(data) })
		if len(modVals) != len(vals) {
			t.Fatalf("modified UTF-8: %d values, not %d", len(modVals), len(vals))
		}
		for i, v := range vals {
			if m := nulFromC080(modVals[i]); !reflect.DeepEqual(m, v) {
				t.Fatalf("modified UTF-8: %#v, not %#v", modVals[i], v)
			}
		}
		// Every value survives encoding and parsing again (numbers are
		// printed as their token).
		for _, v := range vals {
			enc := qapi.Marshal(v)
			back, err := qjson.Parse(string(enc), qjson.Options{})
			if err != nil {
				t.Fatalf("re-parse of %s: %v", enc, err)
			}
			if !reflect.DeepEqual(v, back) {
				t.Fatalf("round trip changed %#v into %#v", v, back)
			}
		}
	})
}

// nulFromC080 is v with every C0 80 in its strings and keys replaced by a
// NUL byte.
func nulFromC080(v any) any {
	switch x := v.(type) {
	case string:
		return strings.ReplaceAll(x, "\xc0\x80", "\x00")
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[nulFromC080(k).(string)] = nulFromC080(e)
		}
		return m
	case []any:
		l := make([]any, len(x))
		for i, e := range x {
			l[i] = nulFromC080(e)
		}
		return l
	}
	return v
}
