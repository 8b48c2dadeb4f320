package control

import (
	"strings"
	"testing"
)

// Requests are read strictly: known fields, this version, an op, ids that
// can name a folder and a bitmap.
func TestDecode(t *testing.T) {
	for msg, want := range map[string]string{
		`{"version":1,"op":"backup","id":"20261205T123434Z-27676a","parent":"20261205T123433Z-000000","files":["disk0"]}`: "",
		`{"version":1,"op":"commit","id":"a1"}`:                              "",
		`{"version":2,"op":"commit","id":"a1"}`:                              "unsupported version 2",
		`{"version":1,"op":"format","id":"a1"}`:                              `unknown op "format"`,
		`{"version":1,"op":"backup","id":"../x"}`:                            "invalid backup id",
		`{"version":1,"op":"backup","id":"a","parent":"-rf"}`:                "invalid parent id",
		`{"version":1,"op":"backup","id":"a","path":"/etc"}`:                 "unknown field",
		`{"version":1,"op":"backup","id":"a"} {"version":1}`:                 "trailing data",
		`{"version":1,"op":"backup","id":"` + strings.Repeat("a", 41) + `"}`: "invalid backup id",
	} {
		_, err := Decode([]byte(msg))
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", msg, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%s: %v, want %q", msg, err, want)
		}
	}
}
