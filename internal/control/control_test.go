package control

import (
	"strings"
	"testing"
	"time"
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

// An export names when it ends, within MaxExport; a freeze is bounded for
// every op.
func TestDecodeExport(t *testing.T) {
	at := func(d time.Duration) string { return time.Now().Add(d).UTC().Format(time.RFC3339) }
	for msg, want := range map[string]string{
		`{"version":1,"op":"export","id":"e1","until":"` + at(time.Hour) + `"}`:             "",
		`{"version":1,"op":"export-close","id":"e1"}`:                                       "",
		`{"version":1,"op":"export","id":"e1"}`:                                             "give an end within 24h",
		`{"version":1,"op":"export","id":"e1","until":"` + at(25*time.Hour) + `"}`:          "give an end within 24h",
		`{"version":1,"op":"export","id":"e1","until":"` + at(time.Hour) + `","freeze":-1}`: "give at most",
		`{"version":1,"op":"backup","id":"e1","freeze":` + "3600000000000" + `}`:            "give at most 5m0s",
		// a hand-off: one descriptor, the migration's, and an end
		`{"version":1,"op":"migrate","id":"h1","files":["migration"],"until":"` + at(time.Minute) + `"}`:         "",
		`{"version":1,"op":"migrate","id":"h1","files":["migration"]}`:                                           "give an end within 1h",
		`{"version":1,"op":"migrate","id":"h1","files":["migration"],"until":"` + at(2*time.Hour) + `"}`:         "give an end within 1h",
		`{"version":1,"op":"migrate","id":"h1","until":"` + at(time.Minute) + `"}`:                               `takes one descriptor, "migration"`,
		`{"version":1,"op":"migrate","id":"h1","files":["migration","disk0"],"until":"` + at(time.Minute) + `"}`: `takes one descriptor, "migration"`,
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
