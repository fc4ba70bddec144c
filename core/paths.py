"""Where everything lives on disk, resolved once from the data directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096  # what Linux file systems allow


class PathError(ValueError):
    """A user-typed path that is not allowed."""


@dataclass(frozen=True)
class Paths:
    data_dir: Path
    confine: bool = False  # when shared, typed paths must stay inside data_dir

    @property
    def models(self) -> Path:
        return self.data_dir / "models"

    @property
    def stable_diffusion(self) -> Path:
        return self.models / "Stable-diffusion"

    @property
    def lora(self) -> Path:
        return self.models / "Lora"

    @property
    def hypernetworks(self) -> Path:
        return self.models / "hypernetworks"

    @property
    def vae(self) -> Path:
        return self.models / "VAE"

    @property
    def aesthetic_embeddings(self) -> Path:
        return self.models / "aesthetic_embeddings"

    @property
    def embeddings(self) -> Path:
        return self.data_dir / "embeddings"

    @property
    def templates(self) -> Path:
        own = self.data_dir / "textual_inversion_templates"
        return own if own.is_dir() else REPO_DIR / "textual_inversion_templates"

    @property
    def outputs(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def cache(self) -> Path:
        return self.data_dir / ".cache"

    def ensure(self) -> "Paths":
        for folder in (self.stable_diffusion, self.lora, self.hypernetworks, self.vae,
                       self.embeddings, self.outputs, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def resolve(self, typed: str | Path, field: str = "path") -> Path:
        """Turn a user-typed path into an absolute one (relative to data_dir).

        When the app is reachable by others, a path that leaves data_dir (through `..`,
        `~`, an absolute path or a symlink) is refused, and so is one inside a hidden folder
        of data_dir (`.cache` holds the app's own caches and the uploads of every visitor)."""
        text = str(typed).strip()
        if not text:
            raise PathError(f"{field}: no path given")
        if "\x00" in text:
            raise PathError(f"{field}: the path contains a NUL character")
        if len(text.encode("utf-8", "replace")) > MAX_PATH_BYTES or any(
                len(part.encode("utf-8", "replace")) > MAX_NAME_BYTES for part in Path(text).parts):
            raise PathError(f"{field}: the path is too long (at most {MAX_NAME_BYTES} bytes per "
                            f"name, {MAX_PATH_BYTES} in all)")
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.data_dir / path
        if self.confine:
            real = path.resolve()
            root = self.data_dir.resolve()
            if real != root and root not in real.parents:
                raise PathError(f"{field}: {text!r} is outside the data folder {root}, "
                                "which is all a shared app may read or write")
            if any(part.startswith(".") for part in real.relative_to(root).parts):
                raise PathError(f"{field}: {text!r} is inside a hidden folder of the data "
                                "folder, which a shared app may not read or write")
        return path
