"""Starting `moestream serve` on a fresh random-weight model, for the drivers in this folder.

The server is started with `--port 0`; its address is read from the line it prints, and the
driver waits for "ready" (the model loaded). `stop()` sends SIGTERM and checks the exit status.
"""
import os
import signal
import subprocess
import tempfile
import threading

MODEL_NAME = "tiny-qwen3-moe"


def synth_model(binary, workdir):
    """A tiny qwen3_moe model (random weights, byte-level tokenizer, Qwen3 chat template)."""
    out = os.path.join(workdir, "model")
    subprocess.run(
        [binary, "synth", "--arch", "qwen3_moe", "--preset", "tiny", "--format", "hf-f32",
         "--seed", "1", out],
        check=True, capture_output=True)
    return out


class Server:
    def __init__(self, binary, model, *extra):
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--port", "0",
             "--served-model-name", MODEL_NAME, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MOESTREAM_LOG": "error"})
        self.port = None
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            if "http://127.0.0.1:" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
            if "ready" in line:
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self):
        """SIGTERM; returns the exit status (0 expected)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def workdir():
    return tempfile.TemporaryDirectory(prefix="moestream-server-")
