"""DICOM in, DICOM out: Structured Reports of the predictions (:mod:`hmn.deploy.sr`) and a MONAI Deploy
application running a packed bundle on DICOM studies (``python -m hmn.deploy``, :mod:`hmn.deploy.app`).

Needs the optional extra ``pip install -e ".[deploy]"`` (highdicom; monai-deploy-app-sdk for the application).
"""
