"""The length-bias labs: policies trained with GRPO, GSPO and LUSPO (all through
``luspo_rs.policy_loss``) to see what each loss does to response length, and why.
The mechanism lab (``mechanism.py``) trains a tabular stop-policy under two
reward families and five clip settings; the transformer lab (``train.py``) a
small transformer on a task where writing steps makes the answer right.

    python -m lab            # or: make demo; docs/lab.md has the write-up
"""
