"""Regenerate the bundled synthetic preference task (deterministic: same files every time)."""

from dpokit.data.synthetic import write_case_following_task

if __name__ == "__main__":
    print(f"wrote {write_case_following_task()}")
