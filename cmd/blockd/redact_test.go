package main

import (
	"strings"
	"testing"
)

func TestRedactObject(t *testing.T) {
	for _, tc := range []struct {
		arg, msg      string
		wantArg       string
		secret        []string // must not appear in the output
		wantInMessage string
	}{
		{
			arg:     "secret,id=s0,data=hunter2hunter2,keyid=nosuch,iv=AAAA",
			msg:     "No secret with id 'nosuch'",
			wantArg: "secret,id=s0,data=<redacted>,keyid=nosuch,iv=AAAA", secret: []string{"hunter2"},
			wantInMessage: "No secret with id 'nosuch'",
		},
		{ // a single comma splits the secret: keyval names the rest
			arg:     "secret,id=s0,data=pass,wd,format=raw",
			msg:     "Expected '=' after parameter 'wd'",
			wantArg: "secret,id=s0,data=<redacted>,format=raw", secret: []string{"pass", "'wd'"},
			wantInMessage: "Expected '=' after parameter '<redacted>'",
		},
		{
			arg:     "secret,id=s0,data=ab,cdefgh=1,file=/x",
			msg:     "Parameter 'cdefgh' is unexpected",
			wantArg: "secret,id=s0,data=<redacted>,file=/x", secret: []string{"cdefgh", "ab,"},
			wantInMessage: "Parameter '<redacted>' is unexpected",
		},
		{ // ",," is a comma inside the value
			arg:     "secret,id=s0,data=x,,yz,,secret,keyid=k",
			msg:     "No secret with id 'k'",
			wantArg: "secret,id=s0,data=<redacted>,keyid=k", secret: []string{"yz", "x,"},
			wantInMessage: "No secret with id 'k'",
		},
		{
			arg:     `{"qom-type":"secret","id":"s0","data":"jsonsecret99","keyid":"nosuch","iv":"AAAA"}`,
			msg:     "No secret with id 'nosuch'",
			wantArg: `{"data":"<redacted>","id":"s0","iv":"AAAA","keyid":"nosuch","qom-type":"secret"}`, secret: []string{"jsonsecret99"},
			wantInMessage: "No secret with id 'nosuch'",
		},
		{ // malformed JSON: the lexer quotes a piece of the value
			arg:     `{"qom-type":"secret","id":"s0","data":"brokensecret\q"}`,
			msg:     `JSON parse error, stray 'brokensecret\q'`,
			wantArg: `{"qom-type":"secret","id":"s0","data": <redacted>}`, secret: []string{"brokensecret"},
			wantInMessage: "JSON parse error, stray '<redacted>'",
		},
		{ // no data: unchanged
			arg: "secret,id=s0,file=/nonexistent", msg: "Unable to read /nonexistent: no such file",
			wantArg: "secret,id=s0,file=/nonexistent", wantInMessage: "Unable to read /nonexistent: no such file",
		},
	} {
		arg, msg := redactObject(tc.arg, tc.msg)
		if arg != tc.wantArg {
			t.Errorf("%s: argument shown as %s, want %s", tc.arg, arg, tc.wantArg)
		}
		if !strings.Contains(msg, tc.wantInMessage) {
			t.Errorf("%s: message %q, want it to contain %q", tc.arg, msg, tc.wantInMessage)
		}
		for _, s := range tc.secret {
			if strings.Contains(arg, s) || strings.Contains(msg, s) {
				t.Errorf("%s: %q leaked: %s: %s", tc.arg, s, arg, msg)
			}
		}
	}
}

func TestStrayArgumentRedacted(t *testing.T) {
	_, err := parseArgs([]string{"--object", "secret,id=s0,", "data=strayhunter2"})
	if err == nil || strings.Contains(err.Error(), "strayhunter2") || !strings.Contains(err.Error(), "Unexpected argument") {
		t.Fatalf("stray argument error: %v", err)
	}
	_, err = parseArgs([]string{"--objekt=secret,id=s0,data=typohunter2"})
	if err == nil || strings.Contains(err.Error(), "typohunter2") || !strings.Contains(err.Error(), "objekt") {
		t.Fatalf("unknown option error: %v", err)
	}
}
