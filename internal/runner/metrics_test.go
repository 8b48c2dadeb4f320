package runner

import (
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The metrics port refuses a run before QEMU when its token is short or
// unreadable or its port taken, each naming the variable; with a token,
// only a request carrying it exactly gets through.
func TestMetricsServer(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	short, long := filepath.Join(dir, "short"), filepath.Join(dir, "long")
	os.WriteFile(short, []byte("0123456789\n"), 0o600)
	os.WriteFile(long, []byte("0123456789abcdef-token\n"), 0o600)
	taken, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := taken.Addr().(*net.TCPAddr).Port
	for _, c := range []struct {
		port        int
		token, want string
		code        int
	}{
		{freeTCPPort(t), short, "METRICS_TOKEN_FILE", status.ExitConfig},
		{freeTCPPort(t), filepath.Join(dir, "missing"), "METRICS_TOKEN_FILE", status.ExitConfig},
		{takenPort, "", "METRICS_PORT", status.ExitNet},
	} {
		_, err := openMetrics(config.Config{Name: "a", MetricsPort: c.port, MetricsTokenFile: c.token}, log)
		if err == nil || Code(err) != c.code || !strings.Contains(err.Error(), c.want) {
			t.Errorf("port %d token %s: %v (code %d), want %s and exit %d", c.port, c.token, err, Code(err), c.want, c.code)
		}
	}
	m, err := openMetrics(config.Config{Name: "a", MetricsPort: freeTCPPort(t), MetricsTokenFile: long}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	ok := m.authorize(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) }))
	for header, want := range map[string]int{
		"":                              http.StatusUnauthorized,
		"Bearer 0123456789abcdef-toke":  http.StatusUnauthorized,
		"Bearer 0123456789abcdef-token": http.StatusTeapot,
		"Basic 0123456789abcdef-token":  http.StatusUnauthorized,
	} {
		r := httptest.NewRequest("GET", "/metrics", nil)
		if header != "" {
			r.Header.Set("Authorization", header)
		}
		w := httptest.NewRecorder()
		ok.ServeHTTP(w, r)
		if w.Code != want {
			t.Errorf("Authorization %q: %d, want %d", header, w.Code, want)
		}
	}
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
