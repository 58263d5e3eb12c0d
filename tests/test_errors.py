import pytest

from qtk import errors


def test_leaf_errors_have_distinct_exit_codes():
    leaves = [
        errors.UsageError, errors.NotLoggedInError, errors.InvalidTokenError, errors.AccessDeniedError,
        errors.RepoNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError,
        errors.NothingMatchedError, errors.LocalNotFoundError, errors.IntegrityError, errors.UnsafePathError,
        errors.LockTimeoutError, errors.NetworkError, errors.DiskSpaceError,
    ]
    codes = [c.exit_code for c in leaves]
    assert len(set(codes)) == len(codes)
    assert all(c not in (0, 1, 130) for c in codes if c != 2)


def test_errors_subclass_builtins():
    assert issubclass(errors.RepoNotFoundError, FileNotFoundError)
    assert issubclass(errors.LocalNotFoundError, FileNotFoundError)
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.NetworkError, ConnectionError)
    assert issubclass(errors.AccessDeniedError, PermissionError)
    assert issubclass(errors.DiskSpaceError, OSError)


@pytest.mark.parametrize(
    "text",
    ["token hf_abcdefghijklmnopqrstuvwxyz012345 leaked", "Authorization: Bearer sometoken123 end"],
)
def test_redact_hides_tokens(text):
    out = errors.redact(text)
    assert "abcdefghijklmnop" not in out and "sometoken123" not in out
    assert "***" in out


def test_redact_registered_secret_without_prefix():
    errors.register_secret("plainsecretvalue42")
    assert "plainsecretvalue42" not in errors.redact("x plainsecretvalue42 y")


def test_error_message_and_hint_are_redacted():
    e = errors.InvalidTokenError("bad hf_SECRETSECRETSECRETSECRETSECRET00", hint="again hf_SECRETSECRETSECRETSECRETSECRET00")
    assert "SECRET" not in str(e)
    assert "SECRET" not in repr(e.to_dict())


def test_exit_code_table_lists_every_code(qtk):
    r = qtk("exit-codes")
    assert r.exit_code == 0
    for code in (0, 2, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 30, 40, 130):
        assert f"{code:>4}  " in r.stdout
