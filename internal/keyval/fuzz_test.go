package keyval

import (
	"encoding/json"
	"strings"
	"testing"
)

var fuzzSeeds = []string{
	"",
	"driver=file,filename=/tmp/a,,b,cache.direct=on",
	"file,node-name=f,filename=x",
	"nbd,id=e,node-name=n,bitmaps.0=a,bitmaps.1=b",
	"a.0.b=1,a.1.b=2",
	"list.1=goner,list.0=null,list.01=eins,list.2=zwei",
	"a.b=1,a=2",
	"a.0=x,a.99999999999=y",
	"help",
	"val,help,foo=bar",
	"__com.redhat_x=1",
	",,,a=1",
	"=val",
	"socket,id=c,path=/s,server,nowait",
	`{"driver":"file","filename":"/x","n":1.5,"l":[1,{"a":null}]}`,
	`{"a":1,"a":2}`,
	`{"a":1`,
	`{'a':'b\'c',"d":"\u00e9\ud83d\ude00\u0000"}`,
	`{"a":[1,2.5e-3,-0,true,false,null,{}]}`,
	"{\"a\":\"\xc0\x80\xff\"}",
	`{"a":"\u12"}`,
	`{"a":01}`,
}

// checkKeyvalTree verifies the shape keyval input must produce: nested
// maps and non-empty lists with string leaves.
func checkKeyvalTree(t *testing.T, v any) {
	switch x := v.(type) {
	case string:
	case map[string]any:
		for _, e := range x {
			checkKeyvalTree(t, e)
		}
	case []any:
		if len(x) == 0 {
			t.Fatal("empty list from keyval input")
		}
		for _, e := range x {
			checkKeyvalTree(t, e)
		}
	default:
		t.Fatalf("unexpected %T in keyval result", v)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s, "")
		f.Add(s, "driver")
	}
	f.Fuzz(func(t *testing.T, s, implied string) {
		m, err := Parse(s, implied)
		if err != nil {
			if m != nil {
				t.Fatal("result and error")
			}
			return
		}
		if m == nil {
			t.Fatal("nil map without error")
		}
		if strings.HasPrefix(s, "{") {
			// The result must survive a JSON round trip.
			if _, err := json.Marshal(m); err != nil {
				t.Fatal(err)
			}
			return
		}
		checkKeyvalTree(t, m)
		m2, help, err := ParseHelp(s, implied)
		if err != nil || help {
			t.Fatalf("ParseHelp disagrees: %v %v", help, err)
		}
		if len(m2) != len(m) {
			t.Fatal("ParseHelp result differs")
		}
	})
}

func FuzzParseQemuOpts(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s, "")
		f.Add(s, "backend")
	}
	f.Fuzz(func(t *testing.T, s, implied string) {
		o, err := ParseQemuOptsList(s, implied)
		if err != nil {
			return
		}
		for _, opt := range o.Opts {
			if opt.Name == "id" {
				t.Fatal("id in Opts")
			}
		}
		m, order, err := ParseQemuOpts(s, implied)
		if o.Help {
			if err != ErrHelp {
				t.Fatalf("help not reported: %v", err)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(order) != len(m) {
			t.Fatalf("order %q does not match %v", order, m)
		}
		for _, k := range order {
			if k == "id" {
				continue
			}
			if v, _ := o.Get(k); v != m[k] {
				t.Fatalf("value of %q: %q vs %q", k, v, m[k])
			}
		}
	})
}
