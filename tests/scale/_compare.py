"""``compare``, the check the scripts of ``tests/scale`` share.

The scripts run in subprocesses (``python -c``), so the function travels as
source, put in front of each script.
"""

import textwrap

COMPARE = textwrap.dedent(
    """
    import jax
    import numpy as np


    def compare(name, want, got, how):
        \"\"\"Checks ``got`` against ``want`` leaf by leaf, dtypes and shapes too.

        ``how``: ``"bits"``, identical; ``"elementwise"``, to 1e-6 of each
        leaf's largest element (a parameter that crosses zero cannot match to
        1e-6 of itself: an ulp of difference in one of its updates is more);
        ``"norm"``, the difference to 1e-5 of the leaf's norm, for runs whose
        gradients themselves differ in their last bits. Integer leaves (counts,
        flags) must be equal in every case.
        \"\"\"
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                                jax.tree.leaves(got), strict=True):
            where = f"{name}: {jax.tree_util.keystr(path)}"
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, where
            if how == "bits" or a.dtype.kind != "f":
                np.testing.assert_array_equal(b, a, err_msg=where)
            elif how == "elementwise":
                scale = np.max(np.abs(a), initial=0.0)
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * scale,
                                           err_msg=where)
            else:
                a, b = a.astype(np.float64), b.astype(np.float64)
                err = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30)
                assert err <= 1e-5, (where, err)
    """
)
