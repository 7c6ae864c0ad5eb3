"""``--push-to-hub``: upload a finished output directory, card included, to a Hub repository."""

from __future__ import annotations

from pathlib import Path

from mksuite.common.errors import HubUploadError, RecipeError


def check_repo_id(repo_id: str, *, option: str = "--push-to-hub") -> None:
    """Refuse a repo id the Hub would refuse, before anything is built (exit 2)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(
            f"`{repo_id}` is not a valid Hub repo id ({str(error).splitlines()[0]})",
            field=option,
            hint="write `name` (your own namespace) or `org/name`",
        ) from None


def check_can_upload(repo_id: str) -> None:
    """Fail before the run when the upload could not happen at all (offline mode)."""
    from mksuite.common.loading.hub import hub_offline

    if hub_offline():
        raise HubUploadError(
            f"--push-to-hub {repo_id} needs the Hub, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; "
            "nothing was built",
            hint="unset HF_HUB_OFFLINE to upload, or drop --push-to-hub and upload later with `hf upload`",
        )


def upload_model(directory: Path, repo_id: str, *, private: bool, tool: str) -> str:
    """Create ``repo_id`` if needed (private when asked) and upload every file of ``directory``.

    Returns the URL of the commit. An existing repository keeps its visibility.
    """
    import huggingface_hub

    from mksuite.common.loading.hub import hub_endpoint

    check_can_upload(repo_id)
    api = huggingface_hub.HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=f"Upload {directory.name} built with mksuite {tool}",
        )
    except Exception as error:  # every failure here leaves the local output as it is
        raise _upload_failed(directory, repo_id, error) from None
    return str(getattr(commit, "commit_url", commit))


def _upload_failed(directory: Path, repo_id: str, error: Exception) -> HubUploadError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    later = f"the output at {directory} is complete; upload it later with `hf upload {repo_id} {directory}`"
    if status == 401:
        hint = "log in with `hf auth login` or set HF_TOKEN to a token with write access; " + later
    elif status == 403:
        hint = f"your token cannot write to `{repo_id}` (use a write token, or a namespace you own); " + later
    else:
        hint = "check the network connection; " + later
    return HubUploadError(f"uploading {directory} to Hub repo `{repo_id}` failed: {reason}", hint=hint)
